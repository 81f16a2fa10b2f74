"""Saves that run behind training: :func:`async_save` stalls the caller only to plan and to copy its shards to
host memory, then writes the checkpoint in the background: on a thread (``mode="thread"``, the default) or
in a writer process of this rank (``mode="process"``).

    foreground  (the caller, collective on its group)  wait for this process's previous save; plan; one
                all-gather (a failure anywhere fails every rank now); copy every chunk into host buffers
                that are allocated once and reused by the next save of the same state. Column shards go
                straight into their places in whole rows that the node's ranks share (row assembly's staged
                rows; on CUDA one strided device-to-host copy per band), so the background only writes them
    background  prepare, assemble, write, agree, publish: the same phases as :func:`hf_storage.save`, on
                a thread with a dedicated gloo group of the same ranks (created once), or in a writer
                process per rank (started once, its own gloo group; the host copies in shared memory).
                A thread starts at once: it prepares while the foreground copies, and, where each local
                rank has a core to spare (``HF_STORAGE_ASYNC_OVERLAP``), writes every chunk as soon as
                its copy is made

The checkpoint is complete-or-invisible exactly as with :func:`hf_storage.save`. An error of the background
part is raised by the returned future's ``result()`` on every rank, and, if nobody asked for it, by the next
:func:`async_save` of this process.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import functools
import math
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from . import objstore, pipeline, row_assembly, settings
from .collectives import Group, timeout_of
from .errors import HFStorageError


class SaveInProgressError(HFStorageError):
    """``async_save(..., if_busy="raise")`` while this process's previous async save is still writing."""


class SaveFuture(Future):
    """The future of a background save; remembers whether its outcome was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.observed = False

    def result(self, timeout: float | None = None) -> Any:
        self.observed = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.observed = True
        return super().exception(timeout)


class HostCopies:
    """Host copies of one rank's chunks in one flat buffer: allocated for a set of chunk shapes once and reused
    while it repeats. Pinned for CUDA sources (device-to-host copies at full speed, one sync per save); in
    shared memory when another process writes them."""

    def __init__(self) -> None:
        self.key: tuple = ()
        self.flat = torch.empty(0, dtype=torch.uint8)
        self.buffers: list[torch.Tensor] = []
        self.offsets: list[int] = []
        self.shared: SharedFlat | None = None

    def prepare(self, chunks: list[pipeline.Chunk], shared: bool = False) -> list[pipeline.Chunk]:
        """The host copies of ``chunks`` (allocated when their shapes change), not yet filled; ``shared``:
        another process must map them (once shared, the copies stay shared, so alternating thread and process
        saves does not reallocate them)."""
        key = tuple((c.fqn, c.box, c.data.dtype, c.data.is_cuda) for c in chunks)
        if key != self.key or (shared and self.shared is None):
            self._allocate(chunks, shared)
            self.key = key
        return [pipeline.Chunk(c.fqn, buf, c.shape, c.box) for buf, c in zip(self.buffers, chunks)]

    def fill(self, chunks: list[pipeline.Chunk], gate: Gate | None = None, first: int = 0) -> None:
        """Copy ``chunks`` into their host copies, in order; ``gate`` learns each one as it is done (CUDA: all
        at once, after the one synchronisation), counting from ``first``."""
        cuda = any(c.data.is_cuda for c in chunks)
        for i, (buf, c) in enumerate(zip(self.buffers, chunks)):
            buf.copy_(c.data, non_blocking=c.data.is_cuda)
            if gate is not None and not cuda and i + 1 < len(chunks):
                gate.open(first + i + 1)
        if cuda:
            torch.cuda.synchronize()

    def _allocate(self, chunks: list[pipeline.Chunk], shared: bool) -> None:
        self.buffers, self.flat = [], torch.empty(0, dtype=torch.uint8)  # the old copies go first
        if self.shared is not None:
            self.shared.close()
        self.offsets, total = [], 0
        for c in chunks:
            self.offsets.append(total)
            total += -(-c.box.numel * c.data.element_size() // _ALIGN) * _ALIGN
        cuda = any(c.data.is_cuda for c in chunks)
        if shared:
            self.shared = SharedFlat(max(total, 1))
            self.flat = self.shared.tensor
            if cuda:
                torch.cuda.cudart().cudaHostRegister(self.flat.data_ptr(), self.flat.numel(), 0)
        else:
            self.shared = None
            self.flat = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=cuda)
        self.buffers = [view(self.flat, at, c.data.dtype, c.box.sizes) for at, c in zip(self.offsets, chunks)]


class Gate:
    """How many chunks the foreground has copied: the background writes chunk ``i`` once it is there, so the
    writes (and the preparation before them) overlap the copy. The last chunk opens with the stall known."""

    def __init__(self) -> None:
        self.ready = 0
        self.stall: float | None = None  # set with the last chunk: the foreground is done
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def open(self, count: int, stall: float | None = None) -> None:
        with self.cond:
            self.ready = count
            if stall is not None:
                self.stall = stall
            self.cond.notify_all()

    def finished(self) -> float:
        """Until the foreground is done; returns its stall."""
        self._until(lambda: self.stall is not None)
        return self.stall or 0.0

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.cond.notify_all()

    def wait(self, i: int) -> None:
        """Until chunk ``i`` is copied; raises if the copy failed."""
        self._until(lambda: self.ready > i or self.stall is not None)

    def _until(self, done) -> None:
        with self.cond:
            while not done() and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise HFStorageError(f"the host copy of this save failed: {self.error}") from self.error


_ALIGN = 64


class SharedFlat:
    """Host memory another process of this node can map: an anonymous memfd (nothing named, freed with the
    last process that maps it), reached through ``/proc/<pid>/fd/<fd>``."""

    def __init__(self, size: int, owner: tuple[int, int] | None = None):
        if owner is None:
            self.fd = os.memfd_create("hf_storage-host-copies", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
        else:
            self.fd = os.open(f"/proc/{owner[0]}/fd/{owner[1]}", os.O_RDWR | os.O_CLOEXEC)
        self.where = (os.getpid(), self.fd, size)
        self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)

    def close(self) -> None:
        """Unmap and close (the memory goes once no other process maps it either)."""
        del self.tensor
        try:
            self.map.close()
        except BufferError:  # a view is still referenced: the mapping goes with it
            pass
        os.close(self.fd)


def view(flat: torch.Tensor, at: int, dtype: torch.dtype, sizes: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(sizes) * dtype.itemsize
    return flat[at : at + n].view(dtype).view(sizes)


class _Saver:
    """This process's background saves: one at a time, on one thread, with reused host copies."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="hf_storage-async")
        self.copies = HostCopies()
        self.last: SaveFuture | None = None
        self.groups: dict[tuple[int, ...], Any] = {}
        self.writers: dict[tuple[int, ...], WriterProcess] = {}
        self.lock = threading.Lock()

    def writer_for(self, g: Group) -> WriterProcess:
        """This rank's writer process for the ranks of ``g``, started once (one collective to meet)."""
        key = tuple(dist.get_process_group_ranks(g.group or dist.group.WORLD)) if g.on else (0,)
        if key not in self.writers:
            self.writers[key] = WriterProcess(g)
        return self.writers[key]

    def shutdown(self) -> None:
        """At exit: let the last save finish, then stop the writer processes."""
        if self.last is not None:
            self.last.exception()
        for w in self.writers.values():
            w.close()
        self.groups.clear()  # the dedicated groups go now, not during interpreter teardown

    def settle(self, if_busy: str) -> float:
        """Wait for the previous save (or refuse, with ``if_busy="raise"``); raise its error if nobody asked
        for it. Returns the seconds waited."""
        last, start = self.last, time.perf_counter()
        if last is None:
            return 0.0
        if not last.done() and if_busy == "raise":
            raise SaveInProgressError(
                "the previous async_save of this process is still writing; wait for its future "
                "(.result()), or pass if_busy='wait' to let this call wait for it"
            )
        asked = last.observed
        error = last.exception()  # waits for it
        self.last = None
        if error is not None and not asked:
            raise error
        return time.perf_counter() - start

    def group_for(self, g: Group) -> Any:
        """A gloo group of the same ranks as ``g`` for the background collectives, created once."""
        if not g.on:
            return None
        ranks = tuple(dist.get_process_group_ranks(g.group or dist.group.WORLD))
        if ranks not in self.groups:
            self.groups[ranks] = dist.new_group(
                list(ranks), backend="gloo", timeout=timeout_of(g.group), use_local_synchronization=True
            )
        return self.groups[ranks]


class WriterProcess:
    """A process of this rank that owns the writing (``mode="process"``): it maps the host copies (a memfd,
    mapped anew only when they are reallocated), joins a gloo group of its own with the other ranks' writer
    processes, and runs the background phases there, so the training process's GIL and page-cache work stay
    free. A fresh interpreter (not a fork, not a re-run of the training script); it dies with its parent."""

    def __init__(self, g: Group):
        address = (os.environ.get("MASTER_ADDR", socket.gethostname()), _free_port()) if g.rank == 0 else None
        address = g.broadcast(address)
        from_parent, to_child = os.pipe()
        from_child, to_parent = os.pipe()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}  # not the agent's store
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        code = f"from hf_storage.background import writer_main; writer_main({from_parent}, {to_parent})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(from_parent, to_parent), env=env)
        os.close(from_parent)
        os.close(to_parent)
        self.conn_out, self.conn_in = Connection(to_child, readable=False), Connection(from_child, writable=False)
        self.conn_out.send((address, g.rank, g.size, g.timeout(), os.getpid()))
        self.sent: tuple | None = None

    def run(self, copies: HostCopies, job: pipeline.Job, path, opts: pipeline.Options, gate: Gate):
        """Hand the writer this save once the foreground is done: the host copies (whole), the staged rows,
        or the foreground's failure (the writer still attends its collectives and reports it)."""
        try:
            stall, failed = gate.finished(), None
        except HFStorageError as e:
            stall, failed = 0.0, str(e)
        assert copies.shared is not None
        flat = copies.shared.where if self.sent != copies.shared.where else None
        self.sent = copies.shared.where
        ats = [None] * (len(job.chunks) - len(copies.offsets)) + copies.offsets  # staged rows first, no copies
        meta = [(c.fqn, c.shape, c.box, c.data.dtype, at) for c, at in zip(job.chunks, ats)]
        rows = job.assembly.handoff() if job.assembly is not None and failed is None else None
        job_meta = (job.placed, job.fingerprint, job.layout, meta, rows, failed)
        self.conn_out.send(("save", flat, job_meta, os.fspath(path), dataclasses.replace(opts, progress=None), stall))
        status, value = self.conn_in.recv()
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            self.conn_out.send(("stop",))
            self.proc.wait(30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def writer_main(fd_in: int, fd_out: int) -> None:
    """The writer process: one group for its life, then one save per message."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the training process
    conn_in, conn_out = Connection(fd_in, writable=False), Connection(fd_out, readable=False)
    torch.set_num_threads(1)  # memory-bound copies; a second thread pool per rank would fight the trainer's
    address, rank, world, timeout, parent = conn_in.recv()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return
    if world > 1:
        kw = {"timeout": timeout} if timeout is not None else {}
        url = f"tcp://{address[0]}:{address[1]}"
        dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world, **kw)
    flat: SharedFlat | None = None
    while (msg := conn_in.recv())[0] != "stop":
        _, where, job_meta, path, opts, stall = msg
        if where is not None:
            if flat is not None:
                flat.close()
            flat = SharedFlat(where[2], where[:2])
        try:
            assert flat is not None
            conn_out.send(("ok", _write_staged(flat.tensor, job_meta, path, opts, stall)))
        except BaseException as e:
            conn_out.send(("error", e))


def _write_staged(flat: torch.Tensor, job_meta: tuple, path: str, opts: pipeline.Options, stall: float):
    placed, fingerprint, layout, meta, rows, failed = job_meta
    chunks = [pipeline.Chunk(f, _host_view(flat, at, dt, box), shape, box) for f, shape, box, dt, at in meta]
    job = pipeline.Job(placed, chunks, fingerprint, layout=layout)
    if rows is not None:
        job.assembly = row_assembly.attach(rows)
    if failed is not None:
        job.ready = functools.partial(_failed, failed)
    g = Group(None)
    desk = pipeline.seat_shared(g, job, opts, assemble=rows is None and failed is None)
    done = pipeline.write_shared(g, job, desk, path, opts, time.perf_counter())
    return pipeline.summary(path, done, stall)


def _host_view(flat: torch.Tensor, at: int | None, dtype: torch.dtype, box) -> torch.Tensor:
    """A chunk's host copy in ``flat``; None ``at``: its rows were staged (see :func:`_staged`)."""
    return view(flat, at, dtype, box.sizes) if at is not None else _staged(dtype, box)


def _staged(dtype: torch.dtype, box) -> torch.Tensor:
    """The data of a chunk whose rows were staged whole: its size and type, no memory of its own."""
    return torch.empty(box.sizes, dtype=dtype, device="meta")


def _failed(message: str, i: int) -> None:
    raise HFStorageError(message)


_SAVER = _Saver()
atexit.register(lambda: _SAVER.shutdown())


def async_save(
    state_dict: Mapping, path, opts: pipeline.Options, group: Any = None, if_busy: str = "wait", mode: str = "thread"
) -> SaveFuture:
    """See :func:`hf_storage.async_save`."""
    if if_busy not in ("wait", "raise"):
        raise ValueError(f"if_busy must be 'wait' or 'raise', got {if_busy!r}")
    if mode not in ("thread", "process"):
        raise ValueError(f"mode must be 'thread' or 'process', got {mode!r}")
    saver = _SAVER
    with saver.lock:
        start = time.perf_counter()
        saver.settle(if_busy)
        g, gate = Group(group), Gate()
        job, desk, live, rest, writer, failed = _plan(saver, state_dict, path, opts, g, mode, gate)
        if writer is not None:
            work: tuple = (writer.run, saver.copies, job, path, opts)
        else:
            job.ready = gate.wait  # the background starts now: it writes each chunk once it is copied
            work = (_write_here, Group(saver.group_for(g)), job, desk, path, opts)
        future = SaveFuture()
        saver.last = future
        saver.executor.submit(_resolve, future, work, gate)
        if failed is not None:
            future.observed = True  # the caller gets the error now; the next save does not raise it again
            raise failed
        overlap = gate if writer is None and settings.async_overlap(_local_ranks(g)) else None
        _copy(saver.copies, job, live, rest, overlap, gate, future, desk if writer is not None else None)
        gate.open(len(job.chunks), time.perf_counter() - start)
    return future


def _plan(saver: _Saver, state_dict: Mapping, path, opts: pipeline.Options, g: Group, mode: str, gate: Gate) -> tuple:
    """Plan (one all-gather), meet the writer processes (``mode="process"``, the first time), join the node's
    staged rows. Returns ``(job, desk, live chunks, chunks to copy, writer, failure)``; the job's chunks are
    then the staged ones (placeholders) first, then the host copies of the rest. A failure to join fails
    ``gate`` and is returned: the background still runs, to report it."""
    failed, staged = None, set[str]()
    with pipeline.gc_paused():  # the caller's thread only; the background part leaves the collector alone
        job, desk = pipeline.plan_shared(state_dict, opts, g, assemble=not objstore.is_uri(os.fspath(path)))
        writer = saver.writer_for(g) if mode == "process" else None
        live = job.chunks
        try:
            staged, desk = pipeline.join_staged(g, job, desk)
        except Exception as e:  # every rank learns it from the background's report
            gate.fail(e)
            failed, desk = e, None
        first = [_placeholder(c) for c in live if c.fqn in staged]  # their host copies are the staged rows
        rest = [c for c in live if c.fqn not in staged]
        job.chunks = first + saver.copies.prepare(rest, shared=writer is not None)
    return job, desk, live, rest, writer, failed


def _copy(
    copies: HostCopies,
    job: pipeline.Job,
    live: list,
    rest: list,
    overlap: Gate | None,
    gate: Gate,
    future: SaveFuture,
    desk,
) -> None:
    """The stall: the column shards into the staged rows, then the rest into their host copies (``overlap``: the
    background learns each chunk as it is done). A failure fails ``gate`` (the background reports it on every
    rank) and is raised here, to the caller, once. ``desk``: closed at the end (a writer process writes the
    staged rows without meeting)."""
    first = len(job.chunks) - len(rest)
    try:
        if job.assembly is not None:
            job.assembly.stage({c.fqn: (c.data, c.shape, c.box) for c in live if c.fqn in job.assembly.bands})
            if overlap is not None:
                overlap.open(first)
        copies.fill(rest, overlap, first)
    except BaseException as e:
        gate.fail(e)
        future.observed = True
        raise
    finally:
        if desk is not None:
            job.assembly.close()  # type: ignore[union-attr]
            desk.close()


def _placeholder(c: pipeline.Chunk) -> pipeline.Chunk:
    return pipeline.Chunk(c.fqn, _staged(c.data.dtype, c.box), c.shape, c.box)


def _local_ranks(g: Group) -> int:
    """Ranks of this save on this host: torchrun's ``LOCAL_WORLD_SIZE``, else the group's size."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() else g.size


def _resolve(future: SaveFuture, work: tuple, gate: Gate) -> None:
    fn, *args = work
    try:
        future.set_result(fn(*args, gate))
    except BaseException as e:
        future.set_exception(e)


def _write_here(g: Group, job: pipeline.Job, desk, path, opts: pipeline.Options, gate: Gate):
    done = pipeline.write_shared(g, job, desk, path, opts, time.perf_counter())
    return pipeline.summary(path, done, gate.finished())
