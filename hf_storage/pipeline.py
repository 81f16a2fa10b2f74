"""The save path, top to bottom. Each phase is a function here; :func:`save` runs them with its collectives,
and the DCP writer (:mod:`.dcp`) calls the same functions from DCP's callbacks.

    plan      every rank, no I/O    layout of the files, this rank's chunks (exact boxes), all validation
    prepare   rank 0                lock the target, a unique staging directory, every file with its header
    assemble  ranks of one node     column shards' rows are handed to node-local row assembly
    write     every rank            each chunk's runs pwritten at their final offsets; CRC-32 shares folded
    agree     rank 0                every rank's report: errors by rank, layout fingerprints, exact coverage
    publish   rank 0                index JSON last (the commit point), fsync if durable, atomic swap

The verb's collectives, all on the caller's group: one all-gather of :class:`Ready` (every rank validated
before it, so a failure anywhere is known everywhere at once), one broadcast of :class:`Prepared`, one
gather of :class:`Report`, one broadcast of the outcome. A rank that fails after the first keeps attending
the rest (:class:`~.collectives.FirstError`), so its peers learn of it instead of waiting for it.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import checksum, dtypes, engine, objstore, publish, remote, row_assembly, shards
from .box import Box
from .collectives import FirstError, Group
from .errors import HFStorageError, PeerFailure, SaveError, UnsupportedEntryError, format_keys
from .layout import INDEX_NAME, Layout, TensorPlacement, TensorSpec
from .layout import plan as plan_layout

FORMAT_VERSION = 1
DEFAULT_THREADS = 4


@dataclass(frozen=True)
class Options:
    """How to save: the keyword arguments of :func:`hf_storage.save`."""

    max_shard_size: int | str | None = None
    fqn_to_index_mapping: Mapping[str, int] | None = None
    thread_count: int = DEFAULT_THREADS
    durable: bool = False
    overwrite: bool = True
    extra_files: Mapping[str, bytes | str] | None = None
    checksums: bool = True
    budget: int = engine.DEFAULT_BUDGET
    progress: Callable[[int], None] | None = None
    lock_wait: float = 0.0


def options(**kwargs: Any) -> Options:
    """:class:`Options` from keyword arguments, naming any that it does not know."""
    unknown = sorted(set(kwargs) - {f.name for f in fields(Options)})
    if unknown:
        known = ", ".join(f.name for f in fields(Options))
        raise TypeError(f"unknown save option(s) {', '.join(unknown)}; the options are: {known}")
    if kwargs.get("thread_count", 1) < 1:
        raise ValueError(f"thread_count must be >= 1, got {kwargs['thread_count']}")
    for name in kwargs.get("extra_files") or {}:
        publish.check_name(name)
    return Options(**kwargs)


@dataclass(frozen=True)
class Chunk:
    """A piece of a tensor this rank writes: ``data`` holds exactly ``box`` of the global ``shape``."""

    fqn: str
    data: torch.Tensor
    shape: tuple[int, ...]
    box: Box


@dataclass
class Job:
    """One rank's plan: where its tensors lie in the files (``placed``) and the chunks it writes there."""

    placed: Mapping[str, TensorPlacement]
    chunks: list[Chunk]
    fingerprint: str = ""
    parts: list[row_assembly.Part] = field(default_factory=list)  # the chunks row assembly can take
    mates: dict[int, row_assembly.Seat] = field(default_factory=dict)  # this node's ranks in row assembly
    layout: Layout | None = None  # the whole layout, where this rank planned it
    ready: Callable[[int], None] | None = None  # async: returns once chunk i's host copy is made
    assembly: row_assembly.Assembly | None = None  # async: row assembly joined when the rows were staged


# -- messages between the ranks ------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """After planning: the layout this rank planned, how its node mates reach it, or why it cannot go on."""

    rank: int
    fingerprint: str = ""
    seat: row_assembly.Seat | None = None
    error: str = ""


@dataclass(frozen=True)
class Prepared:
    """Rank 0 created the staging directory and its files (``mapped``: short runs may go through mappings)."""

    directory: str
    mapped: bool


@dataclass(frozen=True)
class Report:
    """What a rank wrote: per tensor ``(fqn, bytes, CRC share or None)``, or why it failed; to an object store
    also the ETag of every part it uploaded, ``(file, part number from 1, ETag)``."""

    rank: int
    fingerprint: str = ""
    written: tuple[tuple[str, int, int | None], ...] = ()
    error: str = ""
    etags: tuple[tuple[str, int, str], ...] = ()


@dataclass(frozen=True)
class Failure:
    """The save failed; ``failures`` maps each failing rank to what went wrong there."""

    failures: Mapping[int, str] = field(default_factory=dict)


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def fail(failures: Mapping[int, str], me: int, local: BaseException | None = None, alone: bool = False) -> NoReturn:
    """Raise the save's failure on this rank: a :class:`SaveError` naming every failing rank, the same on every
    rank (this rank's own error is its ``__cause__``). ``alone`` (no other rank): our own specific error as is."""
    if alone and isinstance(local, HFStorageError):
        raise local
    raise SaveError(f"{failure_message(failures)} (this is rank {me})", dict(failures)) from local


def failure_message(failures: Mapping[int, str]) -> str:
    ranks = sorted(failures)
    who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[:20]}"
    text = "; ".join(f"rank {r}: {failures[r]}" for r in ranks[:20])
    return f"the save failed on {who}: {text}; nothing was published"


# -- plan ------------------------------------------------------------------------------------------


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


def tensors_of(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """The state dict's tensors by dotted key; every non-tensor entry named in one error."""
    flat = flatten(state_dict)
    bad = sorted(k for k, v in flat.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise UnsupportedEntryError(
            f"the safetensors format stores tensors only; these state dict entries are not tensors: "
            f"{format_keys(bad)}. Remove them (or save them separately, e.g. as JSON); nothing was written."
        )
    return flat  # type: ignore[return-value]


def plan(state_dict: Mapping, opts: Options, rank: int) -> Job:
    """Everything a rank can know and check alone, before any collective or I/O."""
    dtypes.check_host()  # before the cached layout: every save checks the host
    tensors = tensors_of(state_dict)
    mapping = tuple(sorted(opts.fqn_to_index_mapping.items())) if opts.fqn_to_index_mapping is not None else None
    specs = tuple(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items())
    layout, fp = _layout(specs, opts.max_shard_size, mapping)
    held = {n: shards.of(t, rank) for n, t in tensors.items()}
    problems = [f"tensor {n!r} ({shards.describe(tensors[n])}): {h.problem}" for n, h in held.items() if h.problem]
    if problems:
        raise UnsupportedEntryError(
            f"cannot save these DTensors exactly once: {'; '.join(problems[:10])}. Redistribute them to "
            "Shard/Replicate placements (dtensor.redistribute) before saving; nothing was written."
        )
    chunks = [c for n, h in held.items() for c in _chunks(n, h)]
    return Job(layout.tensors, chunks, fp, layout=layout)


@functools.lru_cache(maxsize=8)
def _layout(specs: tuple[TensorSpec, ...], max_shard_size, mapping) -> tuple[Layout, str]:
    """The layout and its fingerprint, planned once for saves of the same state (every K steps)."""
    layout = plan_layout(
        specs, max_shard_size=max_shard_size, fqn_to_index_mapping=dict(mapping) if mapping is not None else None
    )
    return layout, fingerprint(layout)


def chunks_of(name: str, t: torch.Tensor, rank: int) -> list[Chunk]:
    """The chunks of ``t`` this rank writes: one per piece of its shard (replicas only at coordinate 0)."""
    return _chunks(name, shards.of(t, rank))


def _chunks(name: str, held: shards.Shards) -> list[Chunk]:
    if not held.writes:
        return []
    return [Chunk(name, shards.view(held.data, p.local), held.shape, p.box) for p in held.pieces if not p.box.empty]


def fingerprint(layout: Layout) -> str:
    """Equal on two ranks exactly when they planned the same files, headers included."""
    h = hashlib.sha256()
    for f in layout.files:
        h.update(f.name.encode())
        h.update(f.header)
    return h.hexdigest()


def parts_for_assembly(job: Job) -> list[row_assembly.Part]:
    """This rank's chunks that row assembly can take (column shards), with where their tensors lie."""
    out = []
    for c in job.chunks:
        itemsize = c.data.element_size()
        if row_assembly.wanted(c.shape, c.box, itemsize):
            p = job.placed[c.fqn]
            out.append(row_assembly.Part(c.fqn, c.box, c.shape, itemsize, p.file, p.offset))
    return out


# -- prepare ---------------------------------------------------------------------------------------


def prepare(layout: Layout, path: str | os.PathLike, opts: Options) -> tuple[publish.Staging, bool]:
    """Rank 0: lock the target and create every file of ``layout`` in a fresh staging directory."""
    staging = publish.prepare(path, opts.overwrite, opts.lock_wait)
    try:
        mapped = create_files(staging.directory, layout)
    except BaseException:
        publish.abort(staging)
        raise
    return staging, mapped


def create_files(directory: Path, layout: Layout) -> bool:
    """Create every file of ``layout`` with its header written and its final size.

    On a local filesystem the files' blocks are reserved up front (so running out of space is reported
    here, before any data is written) and the result is True: ranks may then write short runs through
    file mappings. Elsewhere (network filesystems) every byte goes through ``pwrite``.
    """
    mapped = engine.is_local_fs(directory)
    for f in layout.files:
        fd = os.open(directory / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if mapped:
                mapped = engine.preallocate(fd, f.size) or f.size == 0
            engine.pwrite_all(fd, memoryview(f.header), 0)
            os.ftruncate(fd, f.size)
        finally:
            os.close(fd)
    return mapped


# -- assemble + write ------------------------------------------------------------------------------


class Tally:
    """Per tensor: bytes written and the XOR of CRC-32 shares (None as soon as one share is missing)."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = {}

    def add(self, fqn: str, nbytes: int, crc: int | None) -> None:
        cur = self.rows.get(fqn)
        if cur is None:
            self.rows[fqn] = [nbytes, crc]
        else:
            cur[0] += nbytes
            cur[1] = None if cur[1] is None or crc is None else cur[1] ^ crc

    def merge(self, rows: Iterable[tuple[str, int, int | None]]) -> Tally:
        for fqn, nbytes, crc in rows:
            self.add(fqn, nbytes, crc)
        return self

    def items(self) -> tuple[tuple[str, int, int | None], ...]:
        return tuple((f, n, c) for f, (n, c) in self.rows.items())


class _Files:
    """The staging files this rank writes, opened once each."""

    def __init__(self, directory: Path, mapped: bool):
        self.directory, self.mapped = directory, mapped
        self.fds: dict[str, int] = {}

    def fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.directory / name, os.O_RDWR if self.mapped else os.O_WRONLY)
        return self.fds[name]

    def close(self, durable: bool) -> None:
        fds, self.fds = self.fds, {}
        try:
            if durable:
                for fd in fds.values():
                    os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)


def write(job: Job, prepared: Prepared, opts: Options, assembly: row_assembly.Assembly | None = None) -> Tally:
    """Write this rank's chunks: rows handed to ``assembly`` through it, the rest directly. Raises the first
    error once every write in flight has ended; row assembly is told at once, so node mates never wait."""
    files, tally, errors = _Files(Path(prepared.directory), prepared.mapped), Tally(), FirstError()
    pool = engine.IOPool(opts.thread_count)
    progress = _Progress(pool, opts.progress)
    held = {}
    try:
        for i, c in enumerate(job.chunks):
            if job.ready is not None:
                errors.attempt(job.ready, i)
            handed = assembly.bands.get(c.fqn) if assembly is not None else None
            if handed:
                held[c.fqn] = (c.data, c.shape, c.box)
            errors.attempt(_write_direct, pool, files, job.placed[c.fqn], c, opts, tally, handed)
            progress.tick()
        if assembly is not None and errors.error is not None:
            assembly.fail()
        elif assembly is not None:
            rows = errors.attempt(assembly.run, held, files.fd, opts.thread_count, opts.checksums, opts.progress)
            tally.merge((f, n, crc) for f, (n, crc) in (rows or {}).items())
        errors.attempt(pool.drain, progress.tick)
        progress.tick()
    finally:
        errors.always(pool.close)
        errors.always(files.close, opts.durable and errors.error is None)
        if assembly is not None:
            assembly.close()
    errors.raise_first()
    return tally


def _write_direct(
    pool: engine.IOPool, files: _Files, p: TensorPlacement, c: Chunk, opts: Options, tally: Tally, handed
) -> None:
    """Write the chunk's rows that were not handed to row assembly (all of them, without it)."""
    place = engine.Place(files.fd(p.file), p.offset, c.shape)
    acc = checksum.Accumulator() if opts.checksums else None
    buf = _host_buffer(opts.budget)
    if not handed:
        n = engine.write_box(pool, buf, place, c.data, c.box, acc, files.mapped)
    else:
        n = sum(
            engine.write_box(pool, buf, place, c.data.narrow(0, r0, rows), c.box.rows(r0, rows), acc, files.mapped)
            for r0, rows in row_assembly.direct_rows(c.box.sizes[0], handed)
        )
    if n or not handed:
        tally.add(c.fqn, n, None if acc is None else acc.contribution(p.spec.nbytes))


_BUFFERS: dict[int, engine.HostBuffer] = {}  # one host buffer per budget, reused by every save of the process


def _host_buffer(budget: int) -> engine.HostBuffer:
    if budget not in _BUFFERS:
        _BUFFERS.clear()
        _BUFFERS[budget] = engine.HostBuffer(budget)
    return _BUFFERS[budget]


class _Progress:
    """Reports completed bytes to ``fn``, always from the saving thread."""

    def __init__(self, pool: engine.IOPool, fn: Callable[[int], None] | None):
        self.pool, self.fn, self.reported = pool, fn, 0

    def tick(self) -> None:
        done = self.pool.done
        if self.fn is not None and done > self.reported:
            self.fn(done - self.reported)
            self.reported = done


# -- agree + publish -------------------------------------------------------------------------------


def agree(reports: list[Report]) -> Tally:
    """Rank 0: every rank's outcome, fingerprint and tally. Raises :class:`SaveError` naming each failing rank."""
    failures = {r.rank: r.error for r in reports if r.error}
    failures = failures or {r.rank: _DIFFERENT_LAYOUT for r in reports if r.fingerprint != reports[0].fingerprint}
    if failures:
        raise SaveError(failure_message(failures), failures)
    return Tally().merge(row for r in reports for row in r.written)


_DIFFERENT_LAYOUT = (
    "planned a different file layout than rank 0: the state dicts disagree on tensor names, "
    "shapes or dtypes (plain tensors must be identical on every rank)"
)


def finalize(staging: publish.Staging, layout: Layout, written: Tally, opts: Options) -> dict:
    """Check that every tensor's bytes were written exactly once, write the extra files and the index (the
    commit point), publish. Returns the index."""
    index = index_of(layout, written)
    if opts.durable:
        for f in layout.files:
            publish.fsync_path(staging.directory / f.name)
    for name, data in (opts.extra_files or {}).items():
        publish.write_file(staging.directory, name, data.encode() if isinstance(data, str) else data, opts.durable)
    publish.write_file(staging.directory, INDEX_NAME, json.dumps(index, indent=2).encode() + b"\n", opts.durable)
    publish.publish(staging, opts.durable)
    return index


def index_of(layout: Layout, written: Tally) -> dict:
    """The index JSON of a save whose ranks reported ``written``, once every tensor's bytes were written exactly
    once (else :class:`HFStorageError` naming the tensors)."""
    rows = written.rows
    wrong = [
        f"{name} ({rows.get(name, (0,))[0]} of {p.spec.nbytes} bytes)"
        for name, p in layout.tensors.items()
        if rows.get(name, (0,))[0] != p.spec.nbytes
    ]
    if wrong:
        raise HFStorageError(
            "the ranks did not write every element exactly once; nothing was published. "
            f"Tensors: {format_keys(wrong)}. "
            "Check that the shards of each DTensor cover it without overlap."
        )
    return layout.index(_metadata(layout, rows))


def _metadata(layout: Layout, rows: Mapping[str, list]) -> dict[str, object]:
    meta: dict[str, object] = {"format_version": FORMAT_VERSION}
    if all(rows[n][1] is not None for n in layout.tensors if n in rows):
        meta["checksums"] = {
            "algorithm": "crc32",
            "tensors": {
                n: f"{checksum.finalize(rows[n][1] if n in rows else 0, layout.tensors[n].spec.nbytes):08x}"
                for n in layout.order
            },
        }
    return meta


# -- the verb --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveSummary:
    path: str
    files: int
    tensors: int
    total_bytes: int  # bytes of tensor data in the checkpoint
    local_bytes: int  # bytes of this rank's shards
    seconds: float  # of an async save: its background part
    assembled_bytes: int = 0  # of those, bytes assembled into whole rows on the node (column shards)
    stall_seconds: float = 0.0  # of an async save: how long the caller stood still (0 for save)


def summary(path: str | os.PathLike, done: Outcome, stall: float = 0.0) -> SaveSummary:
    layout = done.layout
    return SaveSummary(
        os.fspath(path),
        len(layout.files),
        len(layout.tensors),
        layout.total_size,
        done.local_bytes,
        done.seconds,
        done.assembled_bytes,
        stall,
    )


@dataclass(frozen=True)
class Outcome:
    """What a save did on this rank."""

    layout: Layout
    local_bytes: int
    assembled_bytes: int
    seconds: float


def save(state_dict: Mapping, path: str | os.PathLike, opts: Options, group=None) -> Outcome:
    """The whole save on this rank (see the module docstring for the phases and collectives)."""
    start = time.perf_counter()
    g = Group(group)
    with gc_paused():
        job, desk = plan_shared(state_dict, opts, g)
        return write_shared(g, job, desk, path, opts, start)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector on the saving thread's watch: a save allocates a few objects per
    tensor, and with 50,000 tensors that triggers full collections that walk the whole model's object graph
    (reference counting still frees everything; the collector resumes, as it was, at the end)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def write_shared(
    g: Group, job: Job, desk: row_assembly.Desk | None, path: str | os.PathLike, opts: Options, start: float
) -> Outcome:
    """Everything after planning, on group ``g``: prepare, assemble, write, agree, publish (``start``: when
    the save began, for its timing). An object-store URI goes to :func:`write_remote`."""
    if objstore.is_uri(os.fspath(path)):
        if desk is not None:
            desk.close()
        return write_remote(g, job, objstore.Location.parse(os.fspath(path)), opts, start)
    try:
        staging, prepared = _prepare_shared(g, job, path, opts)
        report, assembled = _write_report(g, job, desk, prepared, opts)
        _agree_publish(g, job, staging, report, opts)
    finally:
        if desk is not None:
            desk.close()
    local = sum(c.data.numel() * c.data.element_size() for c in job.chunks)
    return Outcome(job.layout, local, assembled, time.perf_counter() - start)  # type: ignore[arg-type]


def plan_shared(
    state_dict: Mapping, opts: Options, g: Group, assemble: bool = True
) -> tuple[Job, row_assembly.Desk | None]:
    """Plan on every rank, then one all-gather: a failure or a different layout anywhere fails every rank;
    row assembly learns who shares this rank's node (unless ``assemble`` is False: another process writes)."""
    job, desk, local = None, None, None
    try:
        job = plan(state_dict, opts, g.rank)
        desk = _desk_for(job, opts, g) if assemble else None
        ready = Ready(g.rank, job.fingerprint, desk.seat if desk else None)
    except Exception as e:
        ready, local = Ready(g.rank, error=describe(e)), e
    readies = g.all_gather(ready)
    failures = {r.rank: r.error for r in readies if r.error}
    failures = failures or {r.rank: _DIFFERENT_LAYOUT for r in readies if r.fingerprint != readies[0].fingerprint}
    if failures:
        if desk is not None:
            desk.close()
        fail(failures, g.rank, local, g.size == 1)
    assert job is not None
    if desk is not None:
        job.mates = {r.rank: r.seat for r in readies if r.seat is not None and r.seat.node == desk.seat.node}
    return job, desk


def _desk_for(job: Job, opts: Options, g: Group) -> row_assembly.Desk | None:
    """This rank's desk for row assembly, if it has column shards and ranks to share a node with."""
    job.parts = parts_for_assembly(job) if g.size > 1 and row_assembly.node_name() else []
    return row_assembly.Desk(row_assembly.slot_size(opts.budget)) if job.parts else None


def join_staged(g: Group, job: Job, desk: row_assembly.Desk | None) -> tuple[set[str], row_assembly.Desk | None]:
    """Async: join this node's row assembly at once, with the rows staged in memory the node shares
    (:meth:`row_assembly.Assembly.stage` fills it; the background thread or writer process only writes them).
    Returns the tensors whose chunk rows all go there (they need no other host copy), and the desk, None where
    there is nothing to assemble."""
    if desk is None:
        return set(), None
    try:
        job.assembly = row_assembly.join(g.rank, desk, job.mates, job.parts, g.timeout(), staged=True)
    except BaseException:
        desk.close()
        raise
    if job.assembly is None:
        desk.close()
        return set(), None
    bands = job.assembly.bands
    whole = {c.fqn for c in job.chunks if c.fqn in bands and not row_assembly.direct_rows(c.box.sizes[0], bands[c.fqn])}
    return whole, desk


def seat_shared(g: Group, job: Job, opts: Options, assemble: bool = True) -> row_assembly.Desk | None:
    """Row assembly's seats alone, in one all-gather: for a process that writes what another one planned
    (``assemble`` False: this rank takes no part, but attends)."""
    desk = _desk_for(job, opts, g) if assemble else None
    seats = g.all_gather(desk.seat if desk else None)
    if desk is not None:
        job.mates = {r: s for r, s in enumerate(seats) if s is not None and s.node == desk.seat.node}
    return desk


def _prepare_shared(g: Group, job: Job, path, opts: Options) -> tuple[publish.Staging | None, Prepared]:
    """Rank 0 prepares the staging directory; every rank learns where it is, or that it failed."""

    def make() -> tuple[publish.Staging, Prepared]:
        staging, mapped = prepare(job.layout, path, opts)  # type: ignore[arg-type]
        return staging, Prepared(str(staging.directory), mapped)

    return _from_rank0(g, make)


def _from_rank0(g: Group, make: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """Rank 0 runs ``make() -> (what it keeps, message)``; every rank gets the message, or, where it failed,
    the failure raised on every rank."""
    kept, message, local = None, None, None
    if g.rank == 0:
        try:
            kept, message = make()
        except Exception as e:
            message, local = Failure({0: describe(e)}), e
    message = g.broadcast(message)
    if isinstance(message, Failure):
        fail(message.failures, g.rank, local, g.size == 1)
    assert message is not None  # rank 0 always sends a message or a Failure
    return kept, message


def _write_report(
    g: Group, job: Job, desk: row_assembly.Desk | None, prepared: Prepared, opts: Options
) -> tuple[Report | Exception, int]:
    """Row assembly with this node's ranks, then the writes; a local failure becomes the report.
    Returns it with the bytes that went through row assembly."""
    try:
        assembly = job.assembly
        if assembly is None and desk is not None:
            assembly = row_assembly.join(g.rank, desk, job.mates, job.parts, g.timeout())
        tally = write(job, prepared, opts, assembly)
    except PeerFailure:
        raise  # a peer is gone: no collective can complete, so there is nobody to report to
    except Exception as e:
        return e, 0
    return Report(g.rank, job.fingerprint, tally.items()), _assembled(job, assembly)


def _agree_publish(
    g: Group, job: Job, staging: publish.Staging | None, report: Report | Exception, opts: Options
) -> None:
    """Rank 0 gathers the reports, publishes or aborts; every rank learns the outcome."""
    _conclude(
        g,
        job,
        report,
        lambda reports: finalize(staging, job.layout, agree(reports), opts),  # type: ignore[arg-type]
        lambda: publish.abort(staging),  # type: ignore[arg-type]
    )


def _conclude(
    g: Group, job: Job, report: Report | Exception, finish: Callable[[list[Report]], Any], abort: Callable[[], Any]
) -> None:
    """Every rank's report (a local failure becomes one) to rank 0, which runs ``finish(reports)`` (it raises
    :class:`SaveError` for failed ranks) or, when that fails, ``abort()``; every rank learns the outcome."""
    local = report if isinstance(report, Exception) else None
    if isinstance(report, Exception):
        report = Report(g.rank, job.fingerprint, error=describe(report))
    reports = g.gather(report)
    outcome = None
    if g.rank == 0:
        try:
            finish(reports)  # type: ignore[arg-type]
        except Exception as e:
            abort()
            outcome = Failure(e.failures if isinstance(e, SaveError) else {0: describe(e)})
            local = local or (None if isinstance(e, SaveError) else e)
    outcome = g.broadcast(outcome)
    if isinstance(outcome, Failure):
        fail(outcome.failures, g.rank, local, g.size == 1)


def _assembled(job: Job, assembly: row_assembly.Assembly | None) -> int:
    """Bytes of this rank's chunks that went through row assembly."""
    if assembly is None:
        return 0
    total = 0
    for c in job.chunks:
        rows = sum(hi - lo for lo, hi in assembly.bands.get(c.fqn, ()))
        if rows:
            total += rows * (c.data.numel() // c.box.sizes[0]) * c.data.element_size()
    return total


# -- the same phases to an object store ------------------------------------------------------------


def write_remote(g: Group, job: Job, loc: objstore.Location, opts: Options, start: float) -> Outcome:
    """Everything after planning, to an object store (:mod:`.remote`): describe (every rank's chunk boxes, one
    all-gather), prepare (rank 0: lock, clean up, one upload per file), upload (rounds of ``all_to_all`` for
    parts several ranks hold), agree and publish (rank 0: complete, extra files, index last)."""
    data, parts = _describe_remote(g, job)
    session, uploads = _from_rank0(g, lambda: _begin_uploads(job, loc, opts))
    try:
        tally, etags = remote.write(g, parts, data, uploads.ids, loc, opts.thread_count, opts.budget, opts.checksums)
        report: Report | Exception = Report(g.rank, job.fingerprint, Tally().merge(tally).items(), etags=tuple(etags))
    except PeerFailure:
        if session is not None:
            session.abort()
        raise
    except Exception as e:
        report = e
    _conclude(
        g, job, report, lambda reports: _publish_remote(session, job, parts, reports, opts), lambda: session.abort()
    )
    local = sum(c.data.numel() * c.data.element_size() for c in job.chunks)
    return Outcome(job.layout, local, 0, time.perf_counter() - start)  # type: ignore[arg-type]


def _describe_remote(g: Group, job: Job) -> tuple[list[torch.Tensor], remote.Parts]:
    """Every rank's pieces (where its chunks lie in the files), and this rank's chunk bytes on the host; a
    failure anywhere fails every rank here, before any upload begins."""
    data: list[torch.Tensor] = []
    local: Exception | None = None
    message: list[remote.Piece] | str
    try:
        if job.ready is not None and job.chunks:
            job.ready(len(job.chunks) - 1)  # async: every host copy first
        data = [remote.bytes_of(c.data) for c in job.chunks]
        message = [_piece(job, c) for c in job.chunks]
    except Exception as e:
        local, message = e, describe(e)
    described = g.all_gather(message)
    failures = {r: m for r, m in enumerate(described) if isinstance(m, str)}
    if failures:
        fail(failures, g.rank, local, g.size == 1)
    pieces = [m for m in described if not isinstance(m, str)]
    return data, remote.Parts.plan(job.layout, pieces)  # type: ignore[arg-type]


def _piece(job: Job, c: Chunk) -> remote.Piece:
    p = job.placed[c.fqn]
    return remote.Piece(c.fqn, p.file, p.offset, c.shape, c.data.element_size(), c.box)


def _begin_uploads(job: Job, loc: objstore.Location, opts: Options) -> tuple[remote.Session, remote.Uploads]:
    """Rank 0: lock the prefix and begin one upload per file."""
    session = remote.prepare(loc, job.layout, opts.overwrite, opts.lock_wait)  # type: ignore[arg-type]
    return session, remote.Uploads(dict(session.uploads), session.had_index)


def _publish_remote(
    session: remote.Session, job: Job, parts: remote.Parts, reports: list[Report], opts: Options
) -> None:
    """Rank 0: every rank's outcome and coverage, then the files completed, the extra files, the index last."""
    index = index_of(job.layout, agree(reports))  # type: ignore[arg-type]
    files = remote.complete(session, parts, (e for r in reports for e in r.etags))
    index["metadata"][remote.ETAGS_KEY] = files  # readers pin their reads to these objects
    remote.publish(session, index, opts.extra_files)
