"""Thin ``torch.distributed.checkpoint`` adapters: the phases of :mod:`.pipeline` called from DCP's callbacks.

    prepare_local_plan   every rank    how its node mates reach it, if it has column shards (plan)
    prepare_global_plan  coordinator   layout, lock, staging files; each rank's placements and mates (prepare)
    write_data           every rank    row assembly with its node mates, then the writes (assemble + write)
    finish               coordinator   tallies checked, index written last, atomic publish (agree + publish)

The writer runs no collective of its own: DCP's run on the group given to ``dcp.save`` / ``dcp.async_save``,
and row assembly meets its node mates through shared memory. DCP's own planner checks that the chunks of
every tensor cover it without overlap.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import engine, objstore, pipeline, publish, remote, row_assembly, shards
from .box import Box
from .collectives import Group, timeout_of
from .errors import HFStorageError, StateDictMismatchError, UnsupportedEntryError, format_keys
from .layout import INDEX_NAME, Layout, TensorPlacement, TensorSpec
from .reader import Checkpoint, StoredChunk, open_checkpoint, read_requests, to_metadata


@dataclass(frozen=True)
class _Assignment:
    """What the coordinator sends each rank: the staging directory, where its tensors go, its node mates."""

    prepared: pipeline.Prepared
    placed: dict[str, TensorPlacement]
    mates: dict[int, row_assembly.Seat]


@dataclass(frozen=True)
class _RemoteAssignment:
    """What the coordinator sends each rank for a save to an object store: the upload ids, every rank's pieces
    and the parts they make (the same on every rank), where its tensors go."""

    ids: dict[str, str]
    parts: remote.Parts
    placed: dict[str, TensorPlacement]


@dataclass(frozen=True)
class _PartETags:
    """Rides on a rank's first WriteResult to the coordinator: the parts it uploaded."""

    etags: tuple[tuple[str, int, str], ...]


class HuggingFaceStorageWriter(StorageWriter):
    """DCP storage writer producing a consolidated Hugging Face checkpoint in one pass.

    Same positional and keyword arguments as ``torch.distributed.checkpoint.HuggingFaceStorageWriter``;
    ``save_distributed``, ``enable_consolidation`` and ``thread_count_consolidation`` are accepted for
    compatibility and change nothing: the output is always ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``, written directly by the ranks that hold the data.

    Args:
        path: the checkpoint directory (created; replaced atomically if it holds one and ``overwrite``).
        fqn_to_index_mapping: ``{fqn: file number from 1}``, to choose the files yourself.
        thread_count: I/O threads per rank.

    Keyword options (those of :func:`hf_storage.save`; an unknown one is a ``TypeError`` naming it):
        max_shard_size: start a new file when the next tensor would push the current one past this size
            (``"5GB"``, ``"500MiB"`` or a byte count). Ignored when ``fqn_to_index_mapping`` is given.
        durable: fsync every file and the directory before the checkpoint is published.
        overwrite: replace an existing checkpoint at ``path`` (atomically); if False, refuse.
        extra_files: ``{name: bytes | str}`` written beside the weights before publication (``config.json``).
        checksums: record each tensor's CRC-32 in the index (computed while writing, no second read).
        budget: bytes of host buffer for CUDA / non-contiguous tensors (and of row assembly's slots).
        progress: called on the saving thread with counts of this rank's bytes as their writes complete.
        lock_wait: seconds to wait for another save of the same target to finish before failing.

    Object stores: ``path`` may be ``s3://bucket/prefix`` (see :func:`hf_storage.save`). Parts that several
    ranks hold are assembled over collectives inside ``write_data``, on ``process_group`` (keyword; default: the
    default group). ``dcp.save`` calls ``write_data`` on every rank at once, so that is safe; for
    ``dcp.async_save`` in thread mode pass the dedicated gloo group you give ``dcp.async_save`` (a background
    thread must not share the training's group; without one this is refused by name).

    Raises (through DCP, on every rank): :class:`CheckpointExistsError`, :class:`CheckpointLockedError`,
    :class:`UnsupportedEntryError` (non-tensor entries, dtypes safetensors lacks), :class:`HFStorageError`.

    Example::

        writer = HuggingFaceStorageWriter("/ckpt/step-1000", max_shard_size="5GB")
        dcp.save(model.state_dict(), storage_writer=writer)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fqn_to_index_mapping: dict[str, int] | None = None,
        thread_count: int = 1,
        save_distributed: bool = False,
        enable_consolidation: bool = False,
        thread_count_consolidation: int = 1,
        **options: Any,
    ) -> None:
        super().__init__()
        self.path = _where(path)
        self.group = options.pop("process_group", None)
        self.save_distributed = save_distributed
        self.enable_consolidation = enable_consolidation
        self.thread_count_consolidation = thread_count_consolidation
        if fqn_to_index_mapping is not None:
            options["max_shard_size"] = None
        self.options = pipeline.options(fqn_to_index_mapping=fqn_to_index_mapping, thread_count=thread_count, **options)
        self.rank = 0
        self.layout: Layout | None = None
        self.index: dict | None = None
        self._staging: publish.Staging | None = None
        self._remote: remote.Session | None = None
        self._parts: remote.Parts | None = None
        self._desk: row_assembly.Desk | None = None
        self._cleanup = weakref.finalize(self, _abandon, self.__dict__)

    def __getstate__(self) -> dict:
        """What a background checkpoint process needs (``dcp.async_save`` in process mode): the options only."""
        skip = ("_cleanup", "_staging", "_desk", "_remote", "group")
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        return {**state, "_staging": None, "_desk": None, "_remote": None, "group": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cleanup = weakref.finalize(self, _abandon, self.__dict__)

    # -- StorageWriter protocol ------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        _abandon(self.__dict__)  # a save that failed in another rank's write_data never reached finish()
        if checkpoint_id is not None:
            self.path = _where(checkpoint_id)
        self.layout, self.index = None, None

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.rank = kwargs.get("rank", 0) or 0
        if (
            kwargs.get("use_collectives") is False
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            raise HFStorageError(
                "dcp.save(..., use_collectives=False) makes every rank its own coordinator, and each would write "
                f"its own {self.path} over the others'; call dcp.save with collectives (the default)"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if isinstance(self.path, str) or not row_assembly.node_name() or not any(True for _ in _column_items(plan)):
            return plan
        self._desk = row_assembly.Desk(row_assembly.slot_size(self.options.budget))
        return dataclasses.replace(plan, storage_data=pipeline.Ready(self.rank, seat=self._desk.seat))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        specs = specs_from_plans(plans)
        self.layout = pipeline.plan_layout(
            specs.values(),
            max_shard_size=self.options.max_shard_size,
            fqn_to_index_mapping=self.options.fqn_to_index_mapping,
        )
        if isinstance(self.path, str):
            return self._assign_remote(plans, self.layout, objstore.Location.parse(self.path))
        self._staging, mapped = pipeline.prepare(self.layout, self.path, self.options)
        prepared = pipeline.Prepared(str(self._staging.directory), mapped)
        nodes = _nodes(plans)
        placed = self.layout.tensors
        return [
            dataclasses.replace(
                p,
                storage_data=_Assignment(
                    prepared, {it.index.fqn: placed[it.index.fqn] for it in p.items}, nodes.get(r, {})
                ),
            )
            for r, p in enumerate(plans)
        ]

    def _assign_remote(self, plans: list[SavePlan], layout: Layout, loc: objstore.Location) -> list[SavePlan]:
        """Coordinator, object store: every rank's pieces from the plans, the parts, the lock and the uploads."""
        placed = layout.tensors
        pieces = [[_piece(it, placed[it.index.fqn]) for it in p.items] for p in plans]
        parts = remote.Parts.plan(layout, pieces)
        self._remote = remote.prepare(loc, layout, self.options.overwrite, self.options.lock_wait)
        self._parts = parts
        ids = dict(self._remote.uploads)
        return [
            dataclasses.replace(
                p, storage_data=_RemoteAssignment(ids, parts, {it.index.fqn: placed[it.index.fqn] for it in p.items})
            )
            for p in plans
        ]

    def _write_remote(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        task: _RemoteAssignment = plan.storage_data
        g = Group(self.group)
        if self.group is None and g.size > 1 and threading.current_thread() is not threading.main_thread():
            raise HFStorageError(
                "HuggingFaceStorageWriter to an object store assembles shared parts with collectives; on a background "
                "thread (dcp.async_save) they must not run on the training's default group: pass "
                "process_group=<the dedicated gloo group you give dcp.async_save>; nothing was written"
            )
        data = [remote.bytes_of(_chunk(it, planner).data) for it in plan.items]
        opts = self.options
        loc = objstore.Location.parse(str(self.path))
        rows, etags = remote.write(g, task.parts, data, task.ids, loc, opts.thread_count, opts.budget, opts.checksums)
        results = _write_results(plan, pipeline.Tally().merge(rows))
        extra = (_PartETags(tuple(etags)),)
        if results:
            results[0] = dataclasses.replace(results[0], storage_data=results[0].storage_data + extra)
        else:
            results = [WriteResult(index=MetadataIndex("__hf_storage_parts__"), size_in_bytes=0, storage_data=extra)]
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def _finish_remote(self, results: list[list[WriteResult]]) -> None:
        session, self._remote = self._remote, None
        assert session is not None and self.layout is not None and self._parts is not None
        try:
            rows = [row for rank in results for w in rank for row in w.storage_data if not isinstance(row, _PartETags)]
            etags = [
                e
                for rank in results
                for w in rank
                for x in w.storage_data
                if isinstance(x, _PartETags)
                for e in x.etags
            ]
            index = pipeline.index_of(self.layout, pipeline.Tally().merge(rows))
            index["metadata"][remote.ETAGS_KEY] = remote.complete(session, self._parts, etags)
            remote.publish(session, index, self.options.extra_files)
        except BaseException:
            session.abort()
            raise
        self.index = index

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        refuse_inexact(plan.items, planner, "saved", lambda it: (it.index.fqn, it.tensor_data.chunk))
        if isinstance(plan.storage_data, _RemoteAssignment):
            return self._write_remote(plan, planner)
        task: _Assignment = plan.storage_data
        chunks = [_chunk(it, planner) for it in plan.items]
        job = pipeline.Job(task.placed, chunks)
        desk, self._desk = self._desk, None
        try:
            assembly = None
            if desk is not None and task.mates:
                job.parts = pipeline.parts_for_assembly(job)
                assembly = row_assembly.join(self.rank, desk, task.mates, job.parts, timeout_of(None))
            tally = pipeline.write(job, task.prepared, self.options, assembly)
        finally:
            if desk is not None:
                desk.close()
        fut: Future = Future()
        fut.set_result(_write_results(plan, tally))
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if isinstance(self.path, str):
            return self._finish_remote(results)
        if self.layout is None or self._staging is None:
            raise HFStorageError("finish() called before prepare_global_plan() on the coordinator")
        staging, self._staging = self._staging, None
        tally = pipeline.Tally().merge(row for rank in results for w in rank for row in w.storage_data)
        try:
            self.index = pipeline.finalize(staging, self.layout, tally, self.options)
        except BaseException:
            publish.abort(staging)
            raise

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        text = os.fspath(checkpoint_id) if isinstance(checkpoint_id, (str, os.PathLike)) else None
        return isinstance(text, str) and ("://" not in text or objstore.is_uri(text))


def _where(path: str | os.PathLike) -> Path | str:
    """A local path as a Path; an object-store URI kept as a string (checked now, before any collective)."""
    if objstore.is_uri(os.fspath(path)):
        return objstore.Location.parse(os.fspath(path)).uri
    return Path(path)


def _piece(item, placed: TensorPlacement) -> remote.Piece:
    td = item.tensor_data
    box = Box(tuple(td.chunk.offsets), tuple(td.chunk.sizes))
    return remote.Piece(item.index.fqn, placed.file, placed.offset, tuple(td.size), td.properties.dtype.itemsize, box)


def _chunk(item, planner: SavePlanner) -> pipeline.Chunk:
    """The chunk a DCP write item names (the coordinator refused non-tensor items already)."""
    data, td = planner.resolve_data(item), item.tensor_data
    if not isinstance(data, torch.Tensor) or td is None:
        raise UnsupportedEntryError(f"{item.index.fqn!r} is not a tensor; safetensors stores tensors only")
    return pipeline.Chunk(item.index.fqn, data, tuple(td.size), Box(tuple(td.chunk.offsets), tuple(td.chunk.sizes)))


def refuse_inexact(items, planner, verb: str, where) -> None:
    """DCP places each rank's DTensor shard as one block. Refuse, naming them, the DTensors whose shards are not
    one block (``(Shard(0), _StridedShard(0, 2))`` holds rows {0, 2}), or whose block DCP placed elsewhere:
    their bytes would land in the wrong rows."""
    state = getattr(planner, "state_dict", None) or {}
    bad = {}
    for it in items:
        fqn, chunk = where(it)
        t = state.get(fqn)
        if t is None or not shards.is_dtensor(t):
            continue
        pieces = [p.box for p in shards.of(t).pieces if not p.box.empty]
        placed = Box(tuple(chunk.offsets), tuple(chunk.sizes)) if chunk is not None else None
        if len(pieces) > 1 or (placed is not None and pieces != ([] if placed.empty else [placed])):
            bad[fqn] = shards.describe(t)
    if bad:
        named = "; ".join(f"{k!r} ({v})" for k, v in sorted(bad.items())[:10])
        raise UnsupportedEntryError(
            f"torch.distributed.checkpoint places every shard as one block of rows, so these DTensors would be "
            f"{verb} in the wrong places: {named}. Use hf_storage.save / hf_storage.load, which place each "
            f"piece exactly, or redistribute them to Shard placements first; "
            f"{'nothing was written' if verb == 'saved' else 'no target was filled'}."
        )


def _abandon(state: dict) -> None:
    """Release what a save that never reached ``finish()`` still holds: its staging and lock, its desk, its
    uploads and lease (object stores)."""
    staging, desk, session = state.get("_staging"), state.get("_desk"), state.get("_remote")
    state["_staging"], state["_desk"], state["_remote"] = None, None, None
    if session is not None:
        session.abort()
    if staging is not None:
        publish.abort(staging)
    if desk is not None:
        desk.close()


def _column_items(plan: SavePlan):
    """The write items row assembly could take (column shards)."""
    for it in plan.items:
        td = it.tensor_data
        if td is not None and row_assembly.wanted(
            tuple(td.size), Box(tuple(td.chunk.offsets), tuple(td.chunk.sizes)), td.properties.dtype.itemsize
        ):
            yield it


def _nodes(plans: list[SavePlan]) -> dict[int, dict[int, row_assembly.Seat]]:
    """For each rank in row assembly, the ranks sharing its node (itself included)."""
    by_node: dict[str, dict[int, row_assembly.Seat]] = {}
    for r, p in enumerate(plans):
        ready = p.storage_data
        if isinstance(ready, pipeline.Ready) and ready.seat is not None:
            by_node.setdefault(ready.seat.node, {})[r] = ready.seat
    return {r: mates for mates in by_node.values() for r in mates if len(mates) > 1}


def _write_results(plan: SavePlan, tally: pipeline.Tally) -> list[WriteResult]:
    """One WriteResult per item, carrying that tensor's tally row; rows for tensors this rank has no item of
    (its share of assembled rows) ride on the first item."""
    rows = {fqn: (fqn, n, crc) for fqn, n, crc in tally.items()}
    out = []
    for it in plan.items:
        mine = (rows.pop(it.index.fqn),) if it.index.fqn in rows else ()
        out.append(WriteResult(index=it.index, size_in_bytes=sum(r[1] for r in mine), storage_data=mine))
    if out and rows:
        first = out[0]
        out[0] = dataclasses.replace(first, storage_data=first.storage_data + tuple(rows.values()))
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


class HuggingFaceStorageReader(StorageReader):
    """DCP storage reader for Hugging Face safetensors checkpoints; drop-in for torch's class.

    Loads into any target layout (plain tensors, DTensors on 1-D/2-D meshes, another world size than the
    save), reading only the byte ranges each rank's targets need.

    Args:
        path: the checkpoint directory, or an object-store prefix ``s3://bucket/prefix``.
        thread_count: I/O threads per rank (for an object store: requests in flight).
        allow_cast: convert stored dtypes to the targets'; without it a mismatch raises.
        budget: bytes of host buffer for CUDA / non-contiguous targets and casts.

    Raises: :class:`StateDictMismatchError` naming every key whose dtype differs (without ``allow_cast``);
    :class:`CheckpointFormatError` for a malformed checkpoint.

    Example::

        dcp.load(state_dict, storage_reader=HuggingFaceStorageReader("/ckpt/step-1000"))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        thread_count: int = 1,
        *,
        allow_cast: bool = False,
        budget: int = engine.DEFAULT_BUDGET,
    ) -> None:
        super().__init__()
        if thread_count < 1:
            raise ValueError(f"thread_count must be >= 1, got {thread_count}")
        self.path, self.thread_count = _reader_path(path), thread_count
        self.allow_cast = allow_cast
        self.budget = budget
        self.storage_data: dict[MetadataIndex, StoredChunk] = {}
        self.load_id: str | None = None
        self._opened: Checkpoint | None = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = _reader_path(checkpoint_id)
        self.storage_data = {}
        self._opened = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        self._opened = open_checkpoint(self.path)
        md = to_metadata(self._opened)
        md.storage_meta = StorageMeta(checkpoint_id=str(self.path), load_id=self.load_id)
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        refuse_inexact(plan.items, planner, "loaded", lambda it: (it.dest_index.fqn, None))
        bad = [it.dest_index.fqn for it in plan.items if it.type != LoadItemType.TENSOR]
        if bad:
            raise StateDictMismatchError(
                f"safetensors checkpoints hold tensors only; cannot load {format_keys(sorted(set(bad)))}"
            )
        work, mismatched = [], set()
        for it in plan.items:
            chunk = self.storage_data[it.storage_index]
            target = planner.resolve_tensor(it).detach()
            if target.dtype != chunk.dtype and not self.allow_cast:
                mismatched.add(f"{it.dest_index.fqn} (target {target.dtype}, stored {chunk.dtype})")
            work.append((it, chunk, target))
        if mismatched:
            raise StateDictMismatchError(
                f"dtype mismatch for {format_keys(sorted(mismatched))}; build the targets with the stored dtypes "
                "or pass allow_cast=True"
            )
        read_requests(
            self._opened if self._opened is not None else self.path,  # opened: reads pinned to its ETags
            ((c, t, Box(tuple(it.storage_offsets), tuple(it.lengths))) for it, c, t in work),
            thread_count=self.thread_count,
            budget=self.budget,
        )
        for it, _, target in work:
            planner.commit_tensor(it, target)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        """A local checkpoint directory, or any well-formed ``s3://`` URI (not looked up: no request is made)."""
        if objstore.is_uri(checkpoint_id):
            try:
                objstore.Location.parse(str(checkpoint_id))
            except HFStorageError:
                return False
            return True
        p = Path(checkpoint_id)
        return p.is_dir() and ((p / INDEX_NAME).is_file() or any(p.glob("*.safetensors")))


def _reader_path(path: str | os.PathLike) -> Path | str:
    """A local path as a ``Path``; an object-store URI as it is (``Path`` would fold its ``//``)."""
    return os.fspath(path) if objstore.is_uri(path) else Path(path)
