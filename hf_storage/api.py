"""The two verbs: :func:`save` and :func:`load`, without DCP boilerplate and without gathering plans.

The file layout is a pure function of global shapes, dtypes and the policy, and every rank knows those
(DTensor metadata), so every rank plans the same layout locally. The only collectives are: rank 0 tells
the others that the staging files exist (one broadcast), the ranks check they planned the same layout
and report their writes to rank 0 (one gather), and rank 0 reports the commit (one broadcast).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import _io
from . import commit as _commit
from .errors import HFStorageError, UnsupportedEntryError, format_keys
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
    local_bytes: int  # bytes this rank wrote
    seconds: float


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


def _pg_timeout(group):
    """The timeout the process group was created with (monitored_barrier's own default is 30 minutes)."""
    try:
        pg = group if group is not None else dist.group.WORLD
        return pg._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # private API moved: fall back to torch's default
        return None


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

    def gather(self, obj) -> list | None:
        if not self.on:
            return [obj]
        if dist.get_backend(self.group) == "gloo":
            # names the ranks that never arrive (killed, stuck in I/O) instead of a bare timeout
            try:
                dist.monitored_barrier(self.group, timeout=_pg_timeout(self.group), wait_all_ranks=True)
            except RuntimeError as e:
                m = re.search(r"Ranks? ([\d, ]+) failed", str(e))
                who = f"rank {m.group(1).strip()} did not finish writing in time (killed or stuck in I/O)" if m else str(e)
                raise HFStorageError(f"the save could not complete: {who}; nothing was published ({e})") from e
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

    staging, status = None, "ok"
    if coll.rank == 0:
        try:
            staging = _commit.begin(path, overwrite)
            status = "mapped" if create_files(staging, layout) else "ok"
        except Exception as e:
            status = ("error", 0, f"{type(e).__name__}: {e}")
            if staging is not None:
                _commit.abort(staging)
            if not coll.on:
                raise
            coll.broadcast(status)
            _reraise(e, 0, "preparing the output")
    status = coll.broadcast(status if coll.rank == 0 else None)
    _raise_remote(status, coll.rank, "preparing the output")
    staging = _commit.staging_path(path)

    report: object
    try:
        results = write_chunks(staging, {n: (p.file, p.offset) for n, p in layout.tensors.items()},
                               _local_chunks(tensors, coll.rank), thread_count=thread_count, budget=budget,
                               durable=durable, checksums=checksums, mapped=status == "mapped", progress=progress)
        report = (_fingerprint(layout), [(k, *v) for k, v in tally(results).items()])
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
    return SaveSummary(os.fspath(path), len(layout.files), len(layout.tensors), layout.total_size,
                       sum(r.nbytes for r in results), time.perf_counter() - start)


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
