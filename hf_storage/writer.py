"""One-pass writer: every rank writes its own bytes straight into the final safetensors files.

Three steps, shared by the DCP :class:`HuggingFaceStorageWriter` and by :func:`hf_storage.save`:

1. :func:`create_files` (one rank): plan the layout, create the staging directory and every file with its
   final header and size;
2. :func:`write_chunks` (every rank): ``pwrite`` the runs of each local chunk at their final offsets;
3. :func:`commit` (one rank, after all writes): check that every byte was written exactly once, write the
   index JSON and any extra files, then publish the directory atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from . import _io, _sync, checksum
from . import commit as _commit
from . import exchange as _exchange
from .errors import HFStorageError, PeerFailure, UnsupportedEntryError, format_keys
from .exchange import Exchange, direct_parts
from .layout import INDEX_NAME, Layout, TensorSpec, plan

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Chunk:
    """A local piece of a tensor to write: ``data`` covers ``offsets``/``sizes`` of the global ``shape``."""

    fqn: str
    data: torch.Tensor
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class ChunkResult:
    fqn: str
    nbytes: int
    crc: int | None = None  # this chunk's share of the tensor's linear CRC-32 (see checksum.py)


def create_files(staging: Path, layout: Layout) -> bool:
    """Create every file of ``layout`` in ``staging`` with its header written and its final size.

    On a local filesystem the files' blocks are reserved up front (so running out of space is reported
    here, before any data is written) and the result is True: ranks may then write short runs through
    file mappings. Elsewhere (network filesystems) every byte goes through ``pwrite``.
    """
    mapped = _io.is_local_fs(staging)
    for f in layout.files:
        fd = os.open(staging / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if mapped:
                mapped = _io.preallocate(fd, f.size) or f.size == 0
            _io.pwrite_all(fd, memoryview(f.header), 0)
            os.ftruncate(fd, f.size)
        finally:
            os.close(fd)
    return mapped


def write_chunks(
    staging: Path,
    placements: Mapping[str, tuple[str, int]],
    chunks: Iterable[Chunk],
    *,
    thread_count: int = 1,
    budget: int = _io.DEFAULT_BUDGET,
    durable: bool = False,
    checksums: bool = True,
    mapped: bool = False,
    progress: Callable[[int], None] | None = None,
    exchange: Exchange | None = None,
) -> list[ChunkResult]:
    """Write each chunk's runs into its file. ``placements`` maps FQN -> (file name, data offset).

    ``mapped`` (from :func:`create_files`) lets short runs go through file mappings. With ``exchange``, the
    rows it assembles on the node are handed to it and the rest is written directly; the exchange runs
    (with its barriers) even after a local error, which is raised afterwards.
    """
    fds: dict[str, int] = {}

    def fd_of(file: str) -> int:
        if file not in fds:
            fds[file] = os.open(staging / file, os.O_RDWR if mapped else os.O_WRONLY)
        return fds[file]

    results: list[ChunkResult] = []
    held: dict[str, Chunk] = {}
    failure: BaseException | None = None
    staging_buf = _io.Staging(budget)
    reported = 0

    def tick() -> None:  # progress in completed bytes, always from this thread
        nonlocal reported
        done = pool.done
        if progress is not None and done > reported:
            progress(done - reported)
            reported = done

    try:
        with _io.IOPool(thread_count) as pool:
            try:
                for c in chunks:
                    handed = exchange.bands.get(c.fqn) if exchange is not None else None
                    if handed:
                        held[c.fqn] = c
                    file, base = placements[c.fqn]
                    acc = checksum.Accumulator() if checksums else None
                    n = _write_direct(pool, staging_buf, fd_of(file), c, base, acc, mapped, handed)
                    if n or not handed:
                        nbytes = math.prod(c.shape) * c.data.element_size()
                        results.append(ChunkResult(c.fqn, n, None if acc is None else acc.contribution(nbytes)))
                    tick()
            except Exception as e:
                failure = e
            if exchange is not None and exchange.schedule.rounds:
                try:  # direct writes go on in the background meanwhile
                    results.extend(exchange.run(held, fd_of, thread_count, checksums, failure is not None, progress))
                except PeerFailure as e:
                    failure = e  # nobody is left to report to: this one must surface
                except Exception as e:
                    failure = failure or e
            if failure is not None:
                raise failure
            pool.drain(tick)
            tick()
        if durable:
            for fd in fds.values():
                os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    return results


def _write_direct(pool: _io.IOPool, staging_buf: _io.Staging, fd: int, c: Chunk, base: int, acc, mapped: bool,
                  handed) -> int:
    """Write the chunk's rows that were not handed to the exchange (all of them, without one)."""
    if not handed:
        return _io.write_box(pool, staging_buf, fd, c.data, base, c.shape, c.offsets, c.sizes, acc, mapped)
    n = 0
    for r0, rows in direct_parts(c.sizes, handed):
        off, sz = _io.sub_box(c.offsets, c.sizes, r0, rows)
        n += _io.write_box(pool, staging_buf, fd, c.data.narrow(0, r0, rows), base, c.shape, off, sz, acc, mapped)
    return n


def tally(results: Iterable[ChunkResult], into: dict[str, list] | None = None) -> dict[str, list]:
    """Per tensor: ``[bytes written, XOR of CRC shares or None]``; merges into ``into`` when given."""
    out = {} if into is None else into
    for r in results:
        fqn, nbytes, crc = (r.fqn, r.nbytes, r.crc) if isinstance(r, ChunkResult) else r
        cur = out.get(fqn)
        if cur is None:
            out[fqn] = [nbytes, crc]
        else:
            cur[0] += nbytes
            cur[1] = None if cur[1] is None or crc is None else cur[1] ^ crc
    return out


def commit(
    staging: Path,
    target: str | os.PathLike,
    layout: Layout,
    written: Mapping[str, list],
    *,
    durable: bool = False,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> dict:
    """Check completeness, write the index (the commit point) and publish. Returns the index dict.

    ``written`` is :func:`tally` over every rank's results.
    """
    wrong = [f"{name} ({written.get(name, (0,))[0]} of {p.spec.nbytes} bytes)"
             for name, p in layout.tensors.items() if written.get(name, (0,))[0] != p.spec.nbytes]
    if wrong:
        raise HFStorageError(
            f"the ranks did not write every byte exactly once; nothing was published. Tensors: {format_keys(wrong)}. "
            "Check that the shards of each DTensor cover it without overlap."
        )
    if durable:
        for f in layout.files:
            _commit.fsync_path(staging / f.name)
    for name, data in (extra_files or {}).items():
        _commit.write_file(staging, name, data.encode() if isinstance(data, str) else data, durable)
    meta: dict[str, object] = {"format_version": FORMAT_VERSION}
    if all(written[n][1] is not None for n in layout.tensors if n in written):
        crcs = {n: written[n][1] if n in written else 0 for n in layout.order}
        meta["checksums"] = {"algorithm": "crc32", "tensors": {
            n: f"{checksum.finalize(crcs[n], layout.tensors[n].spec.nbytes):08x}" for n in layout.order}}
    index = layout.index(meta)
    _commit.write_file(staging, INDEX_NAME, json.dumps(index, indent=2).encode() + b"\n", durable)
    _commit.publish(staging, target, durable)
    return index


@dataclass(frozen=True)
class _PlanData:
    """What the coordinator sends each rank: the staging directory and where its tensors go."""

    staging: str
    placements: dict[str, tuple[str, int]]
    mapped: bool = False
    exchange: tuple[str, int, list[int]] | None = None  # row assembly: (token, slot size, ranks on this node)


class HuggingFaceStorageWriter(StorageWriter):
    """DCP storage writer producing a consolidated Hugging Face checkpoint in one pass.

    Same positional and keyword arguments as ``torch.distributed.checkpoint.HuggingFaceStorageWriter``;
    ``save_distributed``, ``enable_consolidation`` and ``thread_count_consolidation`` are accepted for
    compatibility and change nothing: the output is always ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``, written directly by the ranks that hold the data.

    Extra keyword-only arguments:
        max_shard_size: start a new file when the next tensor would push the current one past this size
            (``"5GB"``, ``"500MiB"`` or a byte count). Ignored when ``fqn_to_index_mapping`` is given.
        durable: fsync every file and the directory before the checkpoint is published.
        overwrite: replace an existing checkpoint at ``path`` (atomically); if False, refuse.
        extra_files: ``{name: bytes | str}`` written beside the weights before publication (``config.json``).
        checksums: record each tensor's CRC-32 in the index (computed while writing, no second read).
        budget: bytes of host staging buffer for CUDA / non-contiguous tensors.
        progress: called on the saving thread with counts of this rank's bytes as their writes complete
            (column-shard rows: as they are handed to row assembly); the counts add up to its bytes.

    Example::

        dcp.save(model.state_dict(), storage_writer=HuggingFaceStorageWriter("/ckpt/step-1000", max_shard_size="5GB"))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fqn_to_index_mapping: dict[str, int] | None = None,
        thread_count: int = 1,
        save_distributed: bool = False,
        enable_consolidation: bool = False,
        thread_count_consolidation: int = 1,
        *,
        max_shard_size: int | str | None = None,
        durable: bool = False,
        overwrite: bool = True,
        extra_files: Mapping[str, bytes | str] | None = None,
        checksums: bool = True,
        budget: int = _io.DEFAULT_BUDGET,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        if thread_count < 1:
            raise ValueError(f"thread_count must be >= 1, got {thread_count}")
        self.path = Path(path)
        self.fqn_to_index_mapping = fqn_to_index_mapping
        self.max_shard_size = None if fqn_to_index_mapping is not None else max_shard_size
        self.thread_count = thread_count
        self.save_distributed = save_distributed
        self.enable_consolidation = enable_consolidation
        self.thread_count_consolidation = thread_count_consolidation
        self.durable = durable
        self.overwrite = overwrite
        self.extra_files = dict(extra_files or {})
        self.checksums = checksums
        self.budget = budget
        self.progress = progress
        self.is_coordinator = False
        self.rank = 0
        self.layout: Layout | None = None
        self.index: dict | None = None
        self._staging: Path | None = None

    # -- StorageWriter protocol ------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        self.layout, self.index, self._staging = None, None, None

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank", 0) or 0

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if not _exchange_on(None):
            return plan
        # where this rank runs, if it has column shards: the coordinator groups such ranks by node
        wants = any(True for _ in _column_boxes(plan.items))
        key = _exchange.node_key(_exchange.slot_size(self.budget)) if wants else None
        return dataclasses.replace(plan, storage_data=key)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        specs = specs_from_plans(plans)
        self.layout = plan(specs.values(), max_shard_size=self.max_shard_size,
                           fqn_to_index_mapping=self.fqn_to_index_mapping)
        self._staging = _commit.begin(self.path, self.overwrite)
        try:
            mapped = create_files(self._staging, self.layout)
        except BaseException:
            _commit.abort(self._staging)
            raise
        where = {n: (t.file, t.offset) for n, t in self.layout.tensors.items()}
        staging = str(self._staging)
        groups = self._exchange_schedules(plans)
        return [dataclasses.replace(p, storage_data=_PlanData(
                    staging, {it.index.fqn: where[it.index.fqn] for it in p.items}, mapped, group))
                for p, group in zip(plans, groups)]

    def _exchange_schedules(self, plans: list[SavePlan]) -> list[tuple[str, int, list[int]] | None]:
        """Row assembly over the default group (its barriers), when DCP saves over all of it: who shares a node."""
        if not _exchange_on(len(plans)):
            return [None] * len(plans)
        keys = [p.storage_data if isinstance(p.storage_data, tuple) else None for p in plans]  # O(ranks)
        if all(k is None for k in keys):
            return [None] * len(plans)
        nodes: dict[tuple, list[int]] = {}
        for r, k in enumerate(keys):
            if k is not None:
                nodes.setdefault(k, []).append(r)
        token, slot = uuid.uuid4().hex, _exchange.slot_size(self.budget)
        return [(token, slot, nodes[k] if k is not None else []) for k in keys]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        data: _PlanData = plan.storage_data
        def chunks():
            for it in plan.items:
                td = it.tensor_data
                tensor = planner.resolve_data(it)
                yield Chunk(it.index.fqn, tensor, tuple(td.size), tuple(td.chunk.offsets), tuple(td.chunk.sizes))

        ex = _dcp_exchange(plan, data)
        results = write_chunks(Path(data.staging), data.placements, chunks(), thread_count=self.thread_count,
                               budget=self.budget, durable=self.durable, checksums=self.checksums, mapped=data.mapped,
                               progress=self.progress, exchange=ex)
        wr = _write_results(plan, results)
        fut: Future = Future()
        fut.set_result(wr)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self.layout is None or self._staging is None:
            raise HFStorageError("finish() called before prepare_global_plan() on the coordinator")
        try:
            self.index = commit(self._staging, self.path, self.layout,
                                tally(r for rank in results for w in rank for r in w.storage_data),
                                durable=self.durable, extra_files=self.extra_files)
        except BaseException:
            _commit.abort(self._staging)
            raise

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike)) and "://" not in str(checkpoint_id)


def _column_boxes(items):
    """``(fqn, offsets, sizes, shape, itemsize)`` of the write items that row assembly takes (column shards)."""
    for it in items:
        td = it.tensor_data
        if td is None:
            continue
        shape, offsets, sizes = tuple(td.size), tuple(td.chunk.offsets), tuple(td.chunk.sizes)
        if _exchange.wants(shape, offsets, sizes, td.properties.dtype.itemsize):
            yield it.index.fqn, offsets, sizes, shape, td.properties.dtype.itemsize


def _dcp_exchange(plan: SavePlan, data: _PlanData) -> Exchange | None:
    """This rank's part of row assembly in a DCP save (every rank calls it: it runs two collectives)."""
    if data.exchange is None:
        return None
    token, slot, mates = data.exchange
    mine = [_exchange.Box(*box, *data.placements[box[0]]) for box in _column_boxes(plan.items)]

    def all_gather(obj) -> list:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    schedule = _exchange.arrange(dist.get_rank(), dist.get_world_size(), mates, mine, token, slot, _sync.barrier,
                                 all_gather)
    return Exchange(schedule, _sync.barrier) if schedule.rounds else None


def _exchange_on(ranks: int | None) -> bool:
    """Row assembly needs more than one rank and a save over the default group, whose barriers it uses
    (``ranks``: the number of plans, None before they are known)."""
    if not (_exchange.enabled() and dist.is_available() and dist.is_initialized()):
        return False
    world = dist.get_world_size()
    return world > 1 and ranks in (None, world)


def _write_results(plan: SavePlan, results: list[ChunkResult]) -> list[WriteResult]:
    """One WriteResult per item, carrying that tensor's results; results for tensors this rank has no item of
    (its share of row-assembled bands) ride on the first item."""
    by_fqn: dict[str, list[ChunkResult]] = {}
    for r in results:
        by_fqn.setdefault(r.fqn, []).append(r)
    out = []
    for it in plan.items:
        mine = tuple(by_fqn.pop(it.index.fqn, ()))
        out.append(WriteResult(index=it.index, size_in_bytes=sum(r.nbytes for r in mine), storage_data=mine))
    if out and by_fqn:
        first = out[0]
        extra = tuple(r for rs in by_fqn.values() for r in rs)
        out[0] = WriteResult(index=first.index, size_in_bytes=first.size_in_bytes, storage_data=first.storage_data + extra)
    return out


def specs_from_plans(plans: list[SavePlan]) -> dict[str, TensorSpec]:
    """Global tensor specs from every rank's write items; refuses non-tensor entries, all named at once.

    Linear in the number of write items, with one comparison per item after the first sighting of an FQN
    (this runs on the coordinator over ranks x tensors items).
    """
    seen: dict[str, tuple[torch.dtype, torch.Size]] = {}
    not_tensors: set[str] = set()
    conflicts: set[str] = set()
    for p in plans:
        for it in p.items:
            td = it.tensor_data
            if td is None or it.type == WriteItemType.BYTE_IO:
                not_tensors.add(it.index.fqn)
                continue
            prev = seen.get(it.index.fqn)
            if prev is None:
                seen[it.index.fqn] = (td.properties.dtype, td.size)
            elif prev[0] != td.properties.dtype or prev[1] != td.size:
                conflicts.add(it.index.fqn)
    if not_tensors:
        raise UnsupportedEntryError(
            f"the safetensors format stores tensors only; these state dict entries are not tensors: "
            f"{format_keys(sorted(not_tensors))}. Remove them (or save them separately, e.g. as JSON); "
            "nothing was written."
        )
    if conflicts:
        raise HFStorageError(f"ranks disagree on the shape or dtype of {format_keys(sorted(conflicts))}")
    return {fqn: TensorSpec(fqn, dt, tuple(size)) for fqn, (dt, size) in seen.items()}
