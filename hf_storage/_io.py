"""Byte movement between tensors and safetensors files: ``pwrite``/``preadv`` of contiguous runs.

A *box* is a chunk of a row-major tensor stored at ``base`` in a file (global ``shape``, ``offsets``,
``sizes``). Its bytes are a set of contiguous runs (:func:`hf_storage.layout.chunk_runs`): one for a
row shard, one per row for a column shard. CPU tensors that are contiguous are written from / read into
their own memory; anything else (CUDA, non-contiguous views, a dtype cast on load) goes through a
staging buffer of at most ``budget`` bytes, one block of leading-dimension rows at a time.

Large runs go through ``pwrite`` on I/O threads. Blocks of many small runs (column shards) are written,
on local filesystems whose files were preallocated, with one strided copy into a shared mapping of the
block's file window (unmapped right after, so memory stays bounded): one memcpy instead of one system
call per row, and no contention on the file's inode lock between ranks writing the same file.
Such blocks are read the same way, from read-only (private, never written) mappings on the I/O threads,
with the next window's pages requested (``POSIX_FADV_WILLNEED``) while the current one is copied; the
windows in flight together stay within ``budget``. ``HF_STORAGE_MMAP=0`` turns mappings off.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from .checksum import Accumulator
from .errors import CheckpointFormatError
from .layout import chunk_runs

DEFAULT_BUDGET = 64 * 2**20
_SPLIT = 32 * 2**20  # large runs are cut into pieces of this size so threads share them
_BATCH = 4 * 2**20  # small runs are grouped into batches of about this many bytes
_INLINE = 64 * 2**10  # single runs smaller than this are written by the calling thread
SMALL_RUN = 256 * 2**10  # blocks whose runs are shorter than this use the mapped strided copy
_PAGE = mmap.ALLOCATIONGRANULARITY
_POPULATE = getattr(mmap, "MAP_POPULATE", 0) if os.environ.get("XPOP","1")=="1" else 0  # map a read window's pages in one call, not one fault each

# statfs magic numbers of local filesystems whose page cache is shared by every process on the host
_LOCAL_FS = {0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0x2FC12FC1, 0x794C7630}


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


def mapping_enabled() -> bool:
    """File mappings for short runs, unless ``HF_STORAGE_MMAP=0`` asks for plain ``pread``/``pwrite``."""
    return os.environ.get("HF_STORAGE_MMAP", "1") != "0"


def is_local_fs(path) -> bool:
    """True on ext4/xfs/btrfs/tmpfs/f2fs/zfs/overlay: mapped writes are coherent across processes."""
    libc = _libc()
    if libc is None or not mapping_enabled():
        return False
    buf = ctypes.create_string_buffer(256)
    if libc.statfs(os.fsencode(os.fspath(path)), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF in _LOCAL_FS


def preallocate(fd: int, size: int) -> bool:
    """Reserve the file's blocks (fallocate, no zero-filling emulation). Raises on ENOSPC."""
    libc = _libc()
    if libc is None or size == 0:
        return False
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if fn(fd, 0, 0, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in (28, 122):  # ENOSPC, EDQUOT
        raise OSError(err, os.strerror(err) + f" (reserving {size} bytes)")
    return False


def as_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    flat = t.detach().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def pread_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            raise CheckpointFormatError(f"unexpected end of file at byte {offset} (file truncated while reading?)")
        buf, offset = buf[n:], offset + n


class IOPool:
    """Runs run-batches on ``threads`` I/O threads, so the caller's thread (checksums, staging copies)
    overlaps with the system calls. ``drain`` waits and re-raises."""

    def __init__(self, threads: int = 1):
        if threads < 1:
            raise ValueError(f"thread_count must be >= 1, got {threads}")
        self.threads = threads
        self._ex = ThreadPoolExecutor(threads, thread_name_prefix="hf_storage-io")
        self._pending: list[Future] = []
        self._inflight = 0  # submitted and not finished (a done-callback counts them down)
        self._lock = threading.Lock()
        self.done = 0  # bytes whose writes or reads have completed (see :meth:`count`)

    def _start(self, fn, *args) -> None:
        with self._lock:
            self._inflight += 1
        fut = self._ex.submit(fn, *args)
        fut.add_done_callback(self._finished)
        self._pending.append(fut)

    def _finished(self, _fut: Future) -> None:
        with self._lock:
            self._inflight -= 1

    def submit(self, fn, fd: int, ops: list[tuple[memoryview, int]]) -> None:
        # a thread hand-off costs more than a small syscall, but only while nothing is in flight: behind a
        # large write to the same file, the caller would wait for the file's lock instead of working
        if len(ops) == 1 and len(ops[0][0]) < _INLINE and not self._inflight:
            fn(fd, *ops[0])
            self.count(len(ops[0][0]))
        else:
            self._start(self._run_ops, fn, fd, ops)

    def _run_ops(self, fn, fd: int, ops: list[tuple[memoryview, int]]) -> None:
        for buf, offset in ops:
            fn(fd, buf, offset)
            self.count(len(buf))

    def count(self, nbytes: int) -> None:
        """Add ``nbytes`` to :attr:`done` (ops run here count themselves; callers count what they copy)."""
        with self._lock:
            self.done += nbytes

    def call(self, fn, *args) -> None:
        """Run ``fn(*args)`` on an I/O thread (its errors surface at the next ``drain``)."""
        self._start(fn, *args)

    def drain(self, tick: Callable[[], None] | None = None) -> None:
        """Wait for everything submitted; re-raise the first error. ``tick`` is called every 0.2 s meanwhile."""
        pending, self._pending = self._pending, []
        while tick is not None and wait(pending, timeout=0.2).not_done:
            tick()
        errors = [f.exception() for f in pending]
        for e in errors:
            if e is not None:
                raise e

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._ex.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _dispatch(pool: IOPool, fn, fd: int, mv: memoryview, base: int, starts, run_bytes: int, itemsize: int) -> None:
    """Submit the runs of one contiguous block: ``mv`` holds the runs back to back."""
    if run_bytes == 0:
        return
    if len(starts) == 1:
        off = base + int(starts[0]) * itemsize
        for i in range(0, run_bytes, _SPLIT):
            pool.submit(fn, fd, [(mv[i:i + _SPLIT], off + i)])
        return
    per_batch = max(1, _BATCH // run_bytes)
    offs = (starts * itemsize + base).tolist()
    for b in range(0, len(offs), per_batch):
        ops = [(mv[k * run_bytes:(k + 1) * run_bytes], offs[k]) for k in range(b, min(b + per_batch, len(offs)))]
        pool.submit(fn, fd, ops)


def _row_blocks(sizes: tuple[int, ...], step: int):
    """Split the leading dimension into blocks of ``step`` rows (a 0-dim box is one block)."""
    if not sizes:
        yield 0, 1
        return
    for r0 in range(0, sizes[0], max(step, 1)):
        yield r0, min(step, sizes[0] - r0)


def _step(sizes, row_bytes: int, direct: bool, budget: int) -> int:
    if not sizes:
        return 1
    return sizes[0] if direct else max(1, budget // max(row_bytes, 1))


def _is_direct(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous()


def _block(t: torch.Tensor, r0: int, n: int) -> torch.Tensor:
    return t if t.dim() == 0 else t.narrow(0, r0, n)


def sub_box(offsets, sizes, r0: int, n: int):
    if not sizes:
        return offsets, sizes
    return (offsets[0] + r0, *offsets[1:]), (n, *sizes[1:])


class Staging:
    """A reusable host buffer (pinned when CUDA is present) of at most ``budget`` bytes."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget
        self._buf: torch.Tensor | None = None

    def view(self, dtype: torch.dtype, shape) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if self._buf is None or self._buf.numel() < nbytes:
            pin = torch.cuda.is_available()
            self._buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        return self._buf[:nbytes].view(dtype).view(tuple(shape))


def _mapped_copy(fd: int, block: torch.Tensor, base: int, shape, sizes, first: int, last_end: int) -> None:
    """Copy ``block`` (shape ``sizes``) into its box, whose bytes span ``[first, last_end)`` from ``base``."""
    item = block.element_size()
    lo = (base + first) // _PAGE * _PAGE
    with mmap.mmap(fd, base + last_end - lo, offset=lo) as m:
        dst = _window(m, shape, sizes, item, base + first, lo)
        dst.copy_(block.reshape(-1).view(torch.uint8).view(*sizes, item))
        del dst  # release the exported buffer before the mapping closes


def single_run(shape, offsets, sizes) -> int | None:
    """Element offset of a box that is one contiguous run of its tensor (row shard, whole tensor), else None."""
    k = len(shape) - 1
    while k >= 0 and sizes[k] == shape[k]:
        k -= 1
    for d in range(k):
        if sizes[d] != 1:
            return None
    start, stride = 0, 1
    for d in range(len(shape) - 1, -1, -1):
        start += offsets[d] * stride
        stride *= shape[d]
    return start


def _small_direct(t: torch.Tensor, nbytes: int) -> bool:
    return nbytes < _INLINE and t.device.type == "cpu" and t.is_contiguous()


def write_box(pool: IOPool, staging: Staging, fd: int, src: torch.Tensor, base: int,
              shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...],
              crc: Accumulator | None = None, mapped: bool = False) -> int:
    """Write ``src`` (the box's data, shape ``sizes``) into its runs. Returns bytes written.

    With ``crc``, the runs are also folded into that checksum accumulator while the writes proceed.
    With ``mapped``, a box of many short runs is copied through file mappings of at most ``budget`` bytes
    instead of one ``pwrite`` per run.
    """
    itemsize = src.element_size()
    nbytes = src.numel() * itemsize
    if _small_direct(src, nbytes):  # many small tensors (MoE): one inline pwrite, no run arithmetic
        start = single_run(shape, offsets, sizes)
        if start is not None:
            mv = as_bytes(src)
            pool.submit(pwrite_all, fd, [(mv, base + start * itemsize)])  # inline unless writes are in flight
            if crc is not None:
                crc.add_runs(mv, [start * itemsize], nbytes)
            return nbytes
    direct = _is_direct(src)
    row_bytes = math.prod(sizes[1:]) * itemsize if sizes else itemsize
    step = _step(sizes, row_bytes, direct, staging.budget)
    starts, length = chunk_runs(shape, offsets, sizes)
    use_map = mapped and len(starts) > 1 and length * itemsize < SMALL_RUN
    if use_map:  # the mapped window spans whole global rows: bound it by the budget
        step = min(step, max(1, staging.budget // max(math.prod(shape[1:]) * itemsize, 1)))
    single = not sizes or step >= sizes[0]  # one block: reuse the runs computed above, no narrowing
    written = 0
    for r0, n in _row_blocks(sizes, step):
        block = src if single else _block(src, r0, n)
        if not direct:
            pool.drain()  # the staging buffer is about to be reused
            host = staging.view(block.dtype, block.shape)
            host.copy_(block)
            block = host
        sz = sizes
        if not single:
            off, sz = sub_box(offsets, sizes, r0, n)
            starts, length = chunk_runs(shape, off, sz)
        mv = as_bytes(block)
        if use_map and len(starts):
            _mapped_copy(fd, block, base, shape, sz, int(starts[0]) * itemsize, (int(starts[-1]) + length) * itemsize)
            pool.count(len(mv))
        else:
            _dispatch(pool, pwrite_all, fd, mv, base, starts, length * itemsize, itemsize)
        if crc is not None:
            crc.add_runs(mv, (starts * itemsize).tolist(), length * itemsize)
        written += len(mv)
    if not direct:
        pool.drain()
    return written


def _window(m, shape, sizes, item: int, first: int, lo: int) -> torch.Tensor:
    """The box's bytes inside a mapping ``m`` of the file from byte ``lo``: a strided uint8 view whose last
    dimension is the element's bytes (no alignment needed); ``first`` is the box's first byte in the file."""
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    window = torch.frombuffer(m, dtype=torch.uint8)
    return window.as_strided((*sizes, item), (*(st * item for st in strides), 1), first - lo)


def _mapped_read(fd: int, host: torch.Tensor, base: int, shape, sizes, first: int, last_end: int) -> None:
    """Fill ``host`` (contiguous, stored dtype, shape ``sizes``) from its box spanning ``[first, last_end)``."""
    item = host.element_size()
    lo = (base + first) // _PAGE * _PAGE
    hi = base + last_end
    if os.fstat(fd).st_size < hi:  # a mapping past the end would raise SIGBUS; the pread path names it
        raise CheckpointFormatError(f"unexpected end of file before byte {hi} (file truncated while reading?)")
    # private and writable only so torch accepts the buffer; nothing writes to it, so no page is copied
    with mmap.mmap(fd, hi - lo, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=lo) as m:
        src = _window(m, shape, sizes, item, base + first, lo)
        host.reshape(-1).view(torch.uint8).view(*sizes, item).copy_(src)
        del src  # release the exported buffer before the mapping closes


def _readahead(fd: int, base: int, shape, offsets, sizes, itemsize: int) -> None:
    starts, length = chunk_runs(shape, offsets, sizes)
    if len(starts):
        first = base + int(starts[0]) * itemsize
        os.posix_fadvise(fd, first, base + (int(starts[-1]) + length) * itemsize - first, os.POSIX_FADV_WILLNEED)


def read_box(pool: IOPool, staging: Staging, fd: int, dst: torch.Tensor, stored_dtype: torch.dtype, base: int,
             shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...], mapped: bool = False) -> int:
    """Fill ``dst`` (shape ``sizes``) from the box's runs, casting from ``stored_dtype`` if needed.

    With ``mapped``, a box of many short runs (column shard) is copied out of read-only file mappings of at
    most ``budget`` bytes of whole rows: the kernel maps cached pages in batches and reads ahead, where one
    ``pread`` per row would pay a system call for each.
    """
    itemsize = stored_dtype.itemsize
    nbytes = dst.numel() * itemsize
    if dst.dtype == stored_dtype and _small_direct(dst, nbytes):
        start = single_run(shape, offsets, sizes)
        if start is not None:
            pread_all(fd, as_bytes(dst), base + start * itemsize)
            return nbytes
    direct = _is_direct(dst) and dst.dtype == stored_dtype
    row_bytes = math.prod(sizes[1:]) * itemsize if sizes else itemsize
    step = _step(sizes, row_bytes, direct, staging.budget)
    starts, length = chunk_runs(shape, offsets, sizes)
    use_map = mapped and len(starts) > 1 and length * itemsize < SMALL_RUN
    if use_map:  # windows are mapped on every I/O thread at once: together they stay within the budget
        window = staging.budget // pool.threads
        step = min(step, max(1, window // max(math.prod(shape[1:]) * itemsize, 1)))
    nread = 0
    for r0, n in _row_blocks(sizes, step):
        block = _block(dst, r0, n)
        host = block if direct else staging.view(stored_dtype, block.shape)
        off, sz = sub_box(offsets, sizes, r0, n)
        starts, length = chunk_runs(shape, off, sz)
        if use_map and r0 + n < sizes[0]:  # start reading the next block's pages while this one is copied
            nxt, nsz = sub_box(offsets, sizes, r0 + n, min(n, sizes[0] - r0 - n))
            _readahead(fd, base, shape, nxt, nsz, itemsize)
        if use_map and len(starts):
            pool.call(_mapped_read, fd, host, base, shape, sz, int(starts[0]) * itemsize,
                      (int(starts[-1]) + length) * itemsize)
        else:
            _dispatch(pool, pread_all, fd, as_bytes(host), base, starts, length * itemsize, itemsize)
        if not direct:
            pool.drain()
            block.copy_(host)
        nread += host.numel() * itemsize
    return nread
