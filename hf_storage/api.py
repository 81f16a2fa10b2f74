"""The two verbs: :func:`save` and :func:`load`, without DCP boilerplate and without a central planner.

The file layout is a pure function of global shapes, dtypes and the policy, and every rank knows those
(DTensor metadata), so every rank plans the same layout locally. The collectives are: one all-gather, in
which rank 0 tells the others that the staging files exist and every rank with column shards names its
node; only with column shards, one barrier and one all-gather of round counts to plan row assembly per
node (:mod:`.exchange`), then one barrier per round; one gather, in which the ranks check they planned
the same layout and report their writes to rank 0; and one broadcast of the outcome.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import _io, _sync
from . import commit as _commit
from . import exchange as _exchange
from .errors import HFStorageError, PeerFailure, UnsupportedEntryError, format_keys
from .layout import Layout, TensorSpec, plan
from .reader import Checkpoint, check_targets, open_checkpoint, read_requests
from .writer import Chunk, commit, create_files, tally, write_chunks

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial, Replicate
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Partial = Replicate = None  # type: ignore[assignment,misc]

DEFAULT_THREADS = 4


@dataclass(frozen=True)
class SaveSummary:
    path: str
    files: int
    tensors: int
    total_bytes: int  # bytes of tensor data in the checkpoint
    local_bytes: int  # bytes of this rank's shards
    seconds: float
    assembled_bytes: int = 0  # of those, bytes assembled into whole rows on the node (column shards)


@dataclass(frozen=True)
class LoadSummary:
    path: str
    tensors: int
    local_bytes: int  # bytes this rank read
    seconds: float


def flatten(state_dict: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested mappings become dotted keys, as DCP does."""
    out: dict[str, object] = {}
    for k, v in state_dict.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _tensors(state_dict: Mapping) -> dict[str, torch.Tensor]:
    flat = flatten(state_dict)
    bad = sorted(k for k, v in flat.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise UnsupportedEntryError(
            f"the safetensors format stores tensors only; these state dict entries are not tensors: "
            f"{format_keys(bad)}. Remove them (or save them separately, e.g. as JSON); nothing was written.")
    return flat  # type: ignore[return-value]


def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@functools.lru_cache(maxsize=4096)
def _shard_box(shape: tuple[int, ...], mesh, placements: tuple) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(global offsets, local sizes, whether this rank writes it) of a DTensor shard; cached, since
    MoE-style state repeats a few layouts many times. Replicated data is written once: by mesh coordinate
    0 of each replicated mesh dimension."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(p, Partial) for p in placements):
        raise UnsupportedEntryError("a DTensor with Partial placement holds unreduced values; "
                                    "redistribute it to Shard/Replicate before saving")
    coord = mesh.get_coordinate()
    writes = coord is not None and all(c == 0 for c, p in zip(coord, placements) if isinstance(p, Replicate))
    sizes, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(offsets), tuple(sizes), writes


def local_box(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(local data, global offsets, local sizes)`` of a DTensor's shard, or the whole plain tensor."""
    if _is_dtensor(t):
        offsets, sizes, _ = _shard_box(tuple(t.shape), t._spec.mesh, t._spec.placements)
        return t._local_tensor, offsets, sizes
    return t, (0,) * t.dim(), tuple(t.shape)


def _local_chunks(tensors: dict[str, torch.Tensor], rank: int) -> Iterator[Chunk]:
    for name, t in tensors.items():
        shape = tuple(t.shape)
        if _is_dtensor(t):
            offsets, sizes, writes = _shard_box(shape, t._spec.mesh, t._spec.placements)
            if writes:
                yield Chunk(name, t._local_tensor, shape, offsets, sizes)
        elif rank == 0:
            yield Chunk(name, t, shape, (0,) * len(shape), shape)


def _fingerprint(layout: Layout) -> str:
    h = hashlib.sha256()
    for f in layout.files:
        h.update(f.name.encode())
        h.update(f.header)
    return h.hexdigest()


class _Collective:
    """The few collectives a save needs, as no-ops when not distributed."""

    def __init__(self, group):
        self.on = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.on else 0
        self.size = dist.get_world_size(group) if self.on else 1

    def broadcast(self, obj):
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return box[0]

    def all_gather(self, obj) -> list:
        if not self.on:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        _sync.barrier(self.group)

    def gather(self, obj) -> list | None:
        if not self.on:
            return [obj]
        self.barrier()
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return out


def _reraise(e: BaseException, rank: int, what: str):
    """Raise an HFStorageError naming the failing rank (our own, more specific errors pass through as they are)."""
    if isinstance(e, HFStorageError):
        raise e
    raise HFStorageError(f"{what} failed on rank {rank}: {type(e).__name__}: {e}; nothing was published") from e


def _raise_remote(status, rank: int, what: str) -> None:
    if isinstance(status, tuple) and status and status[0] == "error":
        raise HFStorageError(f"{what} failed on rank {status[1]}: {status[2]} (this is rank {rank})")


def save(
    state_dict: Mapping,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
    fqn_to_index_mapping: Mapping[str, int] | None = None,
    thread_count: int = DEFAULT_THREADS,
    durable: bool = False,
    overwrite: bool = True,
    extra_files: Mapping[str, bytes | str] | None = None,
    checksums: bool = True,
    process_group=None,
    budget: int = _io.DEFAULT_BUDGET,
    progress: Callable[[int], None] | None = None,
) -> SaveSummary:
    """Save a (sharded) state dict as a Hugging Face checkpoint at ``path``. Call on every rank.

    Plain tensors are written by rank 0; each DTensor shard by the rank that holds it (replicas once).
    Returns a :class:`SaveSummary`; raises on every rank if any rank failed, and then publishes nothing.
    """
    start = time.perf_counter()
    coll = _Collective(process_group)
    tensors = _tensors(state_dict)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    layout = plan(specs, max_shard_size=max_shard_size, fqn_to_index_mapping=fqn_to_index_mapping)

    local = list(_local_chunks(tensors, coll.rank))
    slot = _exchange.slot_size(budget)
    mine = [_exchange.Box(c.fqn, c.offsets, c.sizes, c.shape, c.data.element_size(), *_placed(layout, c.fqn))
            for c in local
            if coll.on and _exchange.enabled() and _exchange.wants(c.shape, c.offsets, c.sizes, c.data.element_size())]
    staging, status = None, None
    if coll.rank == 0:
        try:
            staging = _commit.begin(path, overwrite)
            status = ("mapped" if create_files(staging, layout) else "ok", uuid.uuid4().hex, slot)
        except Exception as e:
            status = ("error", 0, f"{type(e).__name__}: {e}")
            if staging is not None:
                _commit.abort(staging)
            if not coll.on:
                raise
            coll.all_gather((status, None))
            _reraise(e, 0, "preparing the output")
    # one collective: rank 0's "files are ready" and, from every rank with column shards, its node
    facts = coll.all_gather((status, _exchange.node_key(slot) if mine else None))
    status = facts[0][0]
    _raise_remote(status, coll.rank, "preparing the output")
    staging = _commit.staging_path(path)
    ex = _exchange_for(coll, [f[1] for f in facts], mine, status[1], status[2])

    report: object
    try:
        results = write_chunks(staging, {n: (p.file, p.offset) for n, p in layout.tensors.items()}, local,
                               thread_count=thread_count, budget=budget, durable=durable, checksums=checksums,
                               mapped=status[0] == "mapped", progress=progress, exchange=ex)
        report = (_fingerprint(layout), [(k, *v) for k, v in tally(results).items()])
    except PeerFailure:
        raise  # a peer is gone: no collective can complete, so there is nobody to report to
    except Exception as e:
        results, report = [], ("error", coll.rank, f"{type(e).__name__}: {e}")
        local_error: Exception | None = e
    else:
        local_error = None
    reports = coll.gather(report)

    outcome: object = "ok"
    if coll.rank == 0:
        try:
            outcome = _commit_reports(reports, staging, path, layout, durable, extra_files)
        except Exception as e:
            _commit.abort(staging)
            outcome = ("error", 0, f"{type(e).__name__}: {e}")
            if not coll.on:
                raise
            coll.broadcast(outcome)
            _reraise(e, 0, "the save")
    outcome = coll.broadcast(outcome)
    if local_error is not None:
        if not coll.on:
            raise local_error
        _reraise(local_error, coll.rank, "the save")
    _raise_remote(outcome, coll.rank, "the save")
    bands = ex.bands if ex is not None else {}
    assembled = sum((hi - lo) * math.prod(c.sizes[1:]) * c.data.element_size()
                    for c in local for lo, hi in bands.get(c.fqn, ()))
    return SaveSummary(os.fspath(path), len(layout.files), len(layout.tensors), layout.total_size,
                       sum(c.data.numel() * c.data.element_size() for c in local), time.perf_counter() - start,
                       assembled)


def _placed(layout: Layout, fqn: str) -> tuple[str, int]:
    p = layout.tensors[fqn]
    return p.file, p.offset


def _exchange_for(coll: _Collective, keys: list, mine: list, token: str, slot: int) -> _exchange.Exchange | None:
    """Row assembly for this save, planned among the ranks of each node (see :mod:`.exchange`)."""
    if all(k is None for k in keys):  # no rank has column shards it could assemble: no more collectives
        return None
    me = keys[coll.rank]
    mates = [r for r, k in enumerate(keys) if me is not None and k == me]
    schedule = _exchange.arrange(coll.rank, coll.size, mates, mine, token, slot, coll.barrier, coll.all_gather)
    return _exchange.Exchange(schedule, coll.barrier) if schedule.rounds else None


def _commit_reports(reports, staging: Path, path, layout: Layout, durable: bool, extra_files) -> str:
    errors = [r for r in reports if isinstance(r, tuple) and r and r[0] == "error"]
    if errors:
        raise HFStorageError("; ".join(f"rank {r[1]}: {r[2]}" for r in errors) + "; nothing was published")
    mine = _fingerprint(layout)
    differ = [i for i, (fp, _) in enumerate(reports) if fp != mine]
    if differ:
        raise HFStorageError(
            f"ranks {differ[:20]} planned a different file layout than rank 0: their state dicts disagree on "
            "tensor names, shapes or dtypes (plain tensors must be identical on every rank); nothing was published")
    written: dict[str, list] = {}
    for _, rows in reports:
        tally(rows, written)
    commit(staging, path, layout, written, durable=durable, extra_files=extra_files)
    return "ok"


def _requests(ckpt: Checkpoint, tensors: dict[str, torch.Tensor]):
    """For each target's local box, the overlap with each stored piece: (piece, target view, box in piece)."""
    for name, t in tensors.items():
        info = ckpt.tensors.get(name)
        if info is None:
            continue
        local, offsets, sizes = local_box(t)
        if len(info.chunks) == 1 and info.chunks[0].shape == info.shape:  # stored whole: the box is the overlap
            if all(sizes):
                yield info.chunks[0], local, offsets, sizes
            continue
        for c in info.chunks:
            begin = [max(o, co) for o, co in zip(offsets, c.offsets)]
            end = [min(o + s, co + cs) for o, s, co, cs in zip(offsets, sizes, c.offsets, c.shape)]
            if any(e <= b for b, e in zip(begin, end)):  # no overlap (a 0-dim tensor always overlaps)
                continue
            view = local
            for d, (b, e) in enumerate(zip(begin, end)):
                view = view.narrow(d, b - offsets[d], e - b)
            yield c, view, tuple(b - co for b, co in zip(begin, c.offsets)), tuple(e - b for b, e in zip(begin, end))


def load(
    state_dict: Mapping,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    allow_cast: bool = False,
    thread_count: int = DEFAULT_THREADS,
    budget: int = _io.DEFAULT_BUDGET,
) -> LoadSummary:
    """Fill the tensors of ``state_dict`` (plain or DTensor, any layout) in place from ``path``.

    Each rank reads the index and headers, then only the byte runs of its own shards. No collectives.
    Raises :class:`StateDictMismatchError` naming every missing key and every shape or dtype mismatch.
    """
    start = time.perf_counter()
    tensors = _tensors(state_dict)
    ckpt = open_checkpoint(path)
    check_targets(ckpt, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, strict=strict,
                  allow_cast=allow_cast)
    n = read_requests(ckpt.directory, _requests(ckpt, tensors), thread_count=thread_count, budget=budget)
    return LoadSummary(os.fspath(path), sum(1 for k in tensors if k in ckpt.tensors), n, time.perf_counter() - start)
