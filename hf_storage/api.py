"""The verbs: :func:`save` and :func:`load`, without DCP boilerplate and without a central planner.

The file layout is a pure function of global shapes, dtypes and the policy, and every rank knows those
(DTensor metadata), so every rank plans the same layout locally; :mod:`.pipeline` runs the save's phases
with four collectives on the caller's group. Loading needs none: each rank reads the headers and then only
the byte runs of its own shards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from . import background, engine, pipeline, shards
from .box import Box
from .pipeline import DEFAULT_THREADS, SaveSummary
from .reader import Checkpoint, StoredChunk, check_targets, open_checkpoint, read_requests


@dataclass(frozen=True)
class LoadSummary:
    path: str
    tensors: int
    local_bytes: int  # bytes this rank read
    seconds: float


def save(state_dict: Mapping, path: str | os.PathLike, *, process_group=None, **options) -> SaveSummary:
    """Save a (sharded) state dict as a Hugging Face checkpoint at ``path``. Call on every rank.

    Plain tensors are written by rank 0; each DTensor shard by the rank that holds it (replicas once).
    The collectives run on ``process_group`` only.

    Args:
        state_dict: tensors and DTensors, nested mappings allowed (keys are joined with dots).
        path: the checkpoint directory. A symbolic link is followed: the directory it names is replaced.
        process_group: the group whose ranks save together (default: the default group). Do not pass a
            group another thread is using at the same time.

    Keyword options (:class:`hf_storage.pipeline.Options`; an unknown one is a ``TypeError`` naming it):
        max_shard_size: start a new file past this size (``"5GB"``, ``"500MiB"``, bytes); None: one file.
        fqn_to_index_mapping: ``{fqn: file number from 1}``, to choose the files yourself.
        thread_count: I/O threads per rank.
        durable: fsync every file and the directory before publishing.
        overwrite: replace an existing checkpoint at ``path`` atomically; if False, refuse.
        extra_files: ``{name: bytes | str}`` written beside the weights (``config.json``).
        checksums: record each tensor's CRC-32 in the index.
        budget: bytes of host buffer for CUDA / non-contiguous data, and of row assembly's slots.
        progress: called on the saving thread with counts of this rank's bytes as their writes complete.
        lock_wait: seconds to wait for another save of the same target before failing.

    Returns:
        A :class:`SaveSummary` of this rank's part.

    Raises:
        SaveError: on every rank, naming each failing rank, when any rank failed; nothing is published.
            On the failing rank, one of the specific errors below is raised instead.
        UnsupportedEntryError: non-tensor entries, dtypes safetensors lacks, Partial placements.
        CheckpointExistsError: ``path`` holds a checkpoint and ``overwrite`` is False.
        CheckpointLockedError: another save of ``path`` is in progress (named: host, pid, start time).

    Example::

        hf_storage.save(model.state_dict(), "/ckpt/step-1000", max_shard_size="5GB")
    """
    opts = pipeline.options(**options)
    return pipeline.summary(path, pipeline.save(state_dict, path, opts, process_group))


def async_save(
    state_dict: Mapping,
    path: str | os.PathLike,
    *,
    if_busy: str = "wait",
    mode: str = "thread",
    process_group=None,
    **kwargs,
) -> Future[SaveSummary]:
    """Save like :func:`save`, but return once this rank's shards are copied to host memory; the checkpoint is
    written on a background thread. Call on every rank. Column shards are copied straight into whole rows that
    the node's ranks share (on CUDA with strided device-to-host copies), so the background only writes them.

    Args:
        state_dict, path: as for :func:`save`.
        if_busy: this process's previous async save still writing: ``"wait"`` for it (counted as stall) or
            ``"raise"`` :class:`SaveInProgressError`.
        mode: where the background part runs: ``"thread"`` (default) or ``"process"``, a writer process of
            this rank started at the first such save (its own gloo group; host copies in shared memory;
            ``progress`` is not called).
        process_group: the group whose ranks save together; the foreground uses it for one all-gather, the
            background uses a gloo group of the same ranks created once for it (never this one).
        **kwargs: every other keyword argument of :func:`save`.

    Returns:
        A future of the :class:`SaveSummary` (``stall_seconds``: how long this call stood still;
        ``seconds``: the background part). ``result()`` raises what :func:`save` would, on every rank; an
        error nobody asked for is raised by the next ``async_save``.

    Raises:
        What :func:`save` raises for invalid input, at once (before anything is copied).

    Example::

        pending = hf_storage.async_save(model.state_dict(), f"/ckpt/step-{step}")
        ...  # train on; the host copies are reused by the next save
        pending.result()
    """
    opts = pipeline.options(**kwargs)
    return background.async_save(state_dict, path, opts, process_group, if_busy, mode)


def load(
    state_dict: Mapping,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    allow_cast: bool = False,
    thread_count: int = DEFAULT_THREADS,
    budget: int = engine.DEFAULT_BUDGET,
) -> LoadSummary:
    """Fill the tensors of ``state_dict`` (plain or DTensor, any layout) in place from ``path``.

    Each rank reads the index and headers, then only the byte runs of its own shards. No collectives.

    Args:
        state_dict: the targets, in the layout you want (their shapes must match the checkpoint's).
        path: the checkpoint directory, or an object-store prefix ``s3://bucket/prefix`` (read with ranged
            GETs of only the bytes this rank needs, each pinned to the ETag the file had when opened).
        strict: every target must be in the checkpoint; with False, missing keys are skipped.
        allow_cast: convert stored dtypes to the targets'.
        thread_count: I/O threads (for an object store: requests in flight; more helps, e.g. 16).
        budget: bytes of host buffer for CUDA / non-contiguous targets and casts.

    Returns:
        A :class:`LoadSummary`.

    Raises:
        StateDictMismatchError: naming every missing key and every shape or dtype mismatch at once.
        CheckpointFormatError: a malformed or incomplete checkpoint.
        ObjectStoreError: a request to the object store failed after its retries (its subclasses
            ObjectChangedError, a file replaced while loading, ObjectStoreThrottledError and
            ObjectStoreUnreachableError name the cause).

    Example::

        hf_storage.load(model.state_dict(), "/ckpt/step-1000")
    """
    start = time.perf_counter()
    with pipeline.gc_paused():
        tensors = pipeline.tensors_of(state_dict)
        ckpt = open_checkpoint(path)
        targets = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
        check_targets(ckpt, targets, strict=strict, allow_cast=allow_cast)
        n = read_requests(ckpt, _requests(ckpt, tensors), thread_count=thread_count, budget=budget)
    return LoadSummary(os.fspath(path), sum(1 for k in tensors if k in ckpt.tensors), n, time.perf_counter() - start)


def _requests(ckpt: Checkpoint, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[StoredChunk, torch.Tensor, Box]]:
    """For each piece of each target's local shard, its overlap with each stored piece:
    ``(stored piece, target view, box inside the stored piece)``."""
    for name, t in tensors.items():
        info = ckpt.tensors.get(name)
        if info is None:
            continue
        held = shards.of(t)
        whole = info.chunks[0] if len(info.chunks) == 1 and not any(info.chunks[0].offsets) else None
        for piece in held.pieces:
            if whole is not None:  # stored whole, as usual: the piece is the overlap, no box arithmetic
                if not piece.box.empty:
                    yield whole, shards.view(held.data, piece.local), piece.box
                continue
            local = shards.view(held.data, piece.local)
            for c in info.chunks:
                stored = Box(c.offsets, c.shape)
                both = piece.box.overlap(stored)
                if both is None or both.empty:
                    continue
                yield c, shards.view(local, both.relative_to(piece.box)), both.relative_to(stored)
