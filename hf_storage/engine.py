"""Byte movement between tensors and safetensors files: ``pwrite``/``preadv`` of contiguous runs.

A *box* is a chunk of a row-major tensor stored at ``base`` in a file (global ``shape``, ``offsets``,
``sizes``, a :class:`~hf_storage.box.Box`). Its bytes are a set of contiguous runs (:meth:`Box.runs`): one for a
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

Files in an object store are read by :class:`RangedReads`, one ranged request per piece: long runs straight
into the target, column shards as spans of whole rows copied out with the same strided window
(:func:`copy_out`) as the mapped reads, neighbouring small tensors merged into one request.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import NamedTuple

import numpy as np
import torch

from . import settings
from .box import Box, strides
from .checksum import Accumulator
from .errors import CheckpointFormatError

DEFAULT_BUDGET = 64 * 2**20
_SPLIT = 32 * 2**20  # large runs are cut into pieces of this size so threads share them
_BATCH = 4 * 2**20  # small runs are grouped into batches of about this many bytes
_INLINE = 64 * 2**10  # single runs smaller than this are written by the calling thread
SMALL_RUN = 256 * 2**10  # blocks whose runs are shorter than this use the mapped strided copy
_PAGE = mmap.ALLOCATIONGRANULARITY

# statfs magic numbers of local filesystems whose page cache is shared by every process on the host and whose
# preallocated blocks stay reserved (ext4, xfs, btrfs, tmpfs, f2fs, overlay). Not ZFS: copy-on-write cannot
# reserve blocks, so a full pool would fail a mapped write as SIGBUS. Nor NFS/Lustre: an I/O error there is a
# SIGBUS too. Those filesystems get plain pread/pwrite.
_LOCAL_FS = {0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0x794C7630}


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


def is_local_fs(path) -> bool:
    """True on ext4/xfs/btrfs/tmpfs/f2fs/overlay: file mappings are coherent across processes, and an I/O
    error cannot turn into SIGBUS once the blocks are reserved. False when ``HF_STORAGE_MMAP=0``."""
    libc = _libc()
    if libc is None or not settings.mapping():
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
    return flat.numpy().data.cast("B")


def copy_rows_from_device(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Copy CUDA ``src`` into the host view ``dst`` (same shape and dtype) as one strided device-to-host copy
    (``cudaMemcpy2DAsync`` on the current stream; the caller synchronises), where each leading-dimension row of
    both is one contiguous run; torch's own ``copy_`` would copy into a temporary first. False (nothing done)
    where that does not hold or the CUDA runtime is not reachable: the caller copies another way."""
    if dst.shape != src.shape or dst.dtype != src.dtype or dst.dim() == 0 or dst.numel() == 0:
        return False
    if not (_rows_are_runs(dst) and _rows_are_runs(src)):
        return False
    memcpy2d = _cuda_memcpy2d()
    if memcpy2d is None:
        return False
    item = dst.element_size()
    width = math.prod(dst.shape[1:]) * item
    dpitch = dst.stride(0) * item if dst.shape[0] > 1 else width
    spitch = src.stride(0) * item if src.shape[0] > 1 else width
    with torch.cuda.device(src.device):
        stream = torch.cuda.current_stream().cuda_stream
        err = memcpy2d(dst.data_ptr(), dpitch, src.data_ptr(), spitch, width, dst.shape[0], 2, stream)
    if err != 0:
        raise RuntimeError(f"cudaMemcpy2DAsync (device to host, {dst.shape[0]} rows of {width} bytes) failed: {err}")
    return True


def _rows_are_runs(t: torch.Tensor) -> bool:
    """Each ``t[i]`` is one contiguous run of memory, rows spaced by a stride of at least a row."""
    row = t[0] if t.dim() > 1 else t.reshape(1, -1)[0]
    return row.is_contiguous() and (t.shape[0] <= 1 or t.stride(0) >= row.numel())


_MEMCPY2D: list = []


def _cuda_memcpy2d():
    """``cudaMemcpy2DAsync`` of the CUDA runtime torch loaded (found in this process's mappings), or None."""
    if not _MEMCPY2D:
        fn = None
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "libcudart" in line})
            if paths:
                fn = ctypes.CDLL(paths[0]).cudaMemcpy2DAsync
                fn.restype = ctypes.c_int
                size, ptr = ctypes.c_size_t, ctypes.c_void_p
                fn.argtypes = [ptr, size, ptr, size, size, size, ctypes.c_int, ptr]
        except (OSError, AttributeError):
            fn = None
        _MEMCPY2D.append(fn)
    return _MEMCPY2D[0]


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


def _dispatch(pool: IOPool, fn, fd: int, mv: memoryview, base: int, starts: np.ndarray, run_bytes: int) -> None:
    """Submit the runs of one contiguous block: ``mv`` holds the runs back to back; ``starts`` in bytes."""
    if run_bytes == 0:
        return
    if len(starts) == 1:
        off = base + int(starts[0])
        for i in range(0, run_bytes, _SPLIT):
            pool.submit(fn, fd, [(mv[i : i + _SPLIT], off + i)])
        return
    per_batch = max(1, _BATCH // run_bytes)
    offs = (starts + base).tolist()
    for b in range(0, len(offs), per_batch):
        ops = [(mv[k * run_bytes : (k + 1) * run_bytes], offs[k]) for k in range(b, min(b + per_batch, len(offs)))]
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


class Place(NamedTuple):
    """Where a tensor lives: an open file, the absolute offset of its first byte, its global shape."""

    fd: int
    base: int
    shape: tuple[int, ...]

    def span(self, box: Box, itemsize: int) -> tuple[int, int, np.ndarray, int]:
        """``(first byte, end byte, run starts in bytes from base, run length in bytes)`` of ``box``."""
        return span(self.shape, box, itemsize)


def span(shape: tuple[int, ...], box: Box, itemsize: int) -> tuple[int, int, np.ndarray, int]:
    """``(first byte, end byte, run starts in bytes, run length in bytes)`` of ``box`` in a tensor of ``shape``
    (bytes counted from the tensor's first byte)."""
    starts, length = box.runs(shape)
    first = int(starts[0]) * itemsize if len(starts) else 0
    end = (int(starts[-1]) + length) * itemsize if len(starts) else 0
    return first, end, starts * itemsize, length * itemsize


def span_rows(shape: tuple[int, ...], itemsize: int, limit: int) -> int:
    """Rows per block when a box is moved through windows of whole rows of its tensor (of ``shape``): as many
    as fit in ``limit`` bytes, at least one."""
    return max(1, limit // max(math.prod(shape[1:]) * itemsize, 1))


class HostBuffer:
    """A reusable host buffer of at most ``budget`` bytes for data that cannot be written from its own memory
    (CUDA tensors, non-contiguous views, casts). Pinned only when the data it takes is on a CUDA device."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget
        self._buf: torch.Tensor | None = None

    def view(self, dtype: torch.dtype, shape, pin: bool = False) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._buf is None or self._buf.numel() < nbytes or (pin and not self._buf.is_pinned()):
            self._buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        return self._buf[:nbytes].view(dtype).view(tuple(shape))


def _window(window: torch.Tensor, shape, sizes, item: int, first: int, lo: int) -> torch.Tensor:
    """The box's bytes inside ``window`` (uint8: a mapping of the file, or a buffer of its bytes, from byte
    ``lo``): a strided uint8 view whose last dimension is the element's bytes (no alignment needed); ``first``
    is the box's first byte in the file."""
    offset = window.storage_offset() + first - lo
    return window.as_strided((*sizes, item), (*(st * item for st in strides(shape)), 1), offset)


def copy_out(window: torch.Tensor, shape, host: torch.Tensor, box: Box, first: int, lo: int) -> None:
    """Fill ``host`` (contiguous, stored dtype, shape ``box.sizes``) with one strided copy from ``window``
    (uint8, the file's bytes from byte ``lo``; ``first``: the box's first byte in the file). Shared by the
    mapped reads of local files and the span reads of objects."""
    item = host.element_size()
    host.reshape(-1).view(torch.uint8).view(*box.sizes, item).copy_(_window(window, shape, box.sizes, item, first, lo))


def _mapped_copy(place: Place, block: torch.Tensor, box: Box, first: int, end: int) -> None:
    """Copy ``block`` (shape ``box.sizes``) into its box, whose bytes span ``[first, end)`` from the base."""
    item = block.element_size()
    lo = (place.base + first) // _PAGE * _PAGE
    with mmap.mmap(place.fd, place.base + end - lo, offset=lo) as m:
        window = torch.frombuffer(m, dtype=torch.uint8)
        dst = _window(window, place.shape, box.sizes, item, place.base + first, lo)
        dst.copy_(block.reshape(-1).view(torch.uint8).view(*box.sizes, item))
        del dst, window  # release the exported buffer before the mapping closes


def _small_direct(t: torch.Tensor, nbytes: int) -> bool:
    return nbytes < _INLINE and t.device.type == "cpu" and t.is_contiguous()


def write_box(
    pool: IOPool,
    buf: HostBuffer,
    place: Place,
    src: torch.Tensor,
    box: Box,
    crc: Accumulator | None = None,
    mapped: bool = False,
) -> int:
    """Write ``src`` (the box's data, shape ``box.sizes``) into its runs. Returns bytes written.

    With ``crc``, the runs are also folded into that checksum accumulator while the writes proceed.
    With ``mapped``, a box of many short runs is copied through file mappings of at most ``budget`` bytes
    instead of one ``pwrite`` per run.
    """
    itemsize = src.element_size()
    nbytes = src.numel() * itemsize
    if _small_direct(src, nbytes) and _write_one_run(pool, place, src, box, crc):
        return nbytes
    direct = _is_direct(src)
    first, end, starts, run = place.span(box, itemsize)
    use_map = mapped and len(starts) > 1 and run < SMALL_RUN
    step = _step(box.sizes, math.prod(box.sizes[1:]) * itemsize if box.sizes else itemsize, direct, buf.budget)
    if use_map:  # the mapped window spans whole global rows: bound it by the budget
        step = min(step, span_rows(place.shape, itemsize, buf.budget))
    single = not box.sizes or step >= box.sizes[0]  # one block: reuse the runs computed above
    for r0, n in _row_blocks(box.sizes, step):
        block = src if single else _block(src, r0, n)
        if not direct:
            pool.drain()  # the host buffer is about to be reused
            host = buf.view(block.dtype, block.shape, pin=block.is_cuda)
            host.copy_(block)
            block = host
        part = box if single else box.rows(r0, n)
        if not single:
            first, end, starts, run = place.span(part, itemsize)
        mv = as_bytes(block)
        if use_map and len(starts):
            _mapped_copy(place, block, part, first, end)
            pool.count(len(mv))
        else:
            _dispatch(pool, pwrite_all, place.fd, mv, place.base, starts, run)
        if crc is not None:
            crc.add_runs(mv, starts.tolist(), run)
    if not direct:
        pool.drain()
    return nbytes


def _write_one_run(pool: IOPool, place: Place, src: torch.Tensor, box: Box, crc: Accumulator | None) -> bool:
    """Many small tensors (MoE): a box that is one run of its file goes out in one inline ``pwrite``, with no
    run arithmetic. False (nothing written) when the box is not one run."""
    start = box.single_run(place.shape)
    if start is None:
        return False
    itemsize = src.element_size()
    mv = as_bytes(src)
    pool.submit(pwrite_all, place.fd, [(mv, place.base + start * itemsize)])  # inline unless busy
    if crc is not None:
        crc.add_runs(mv, [start * itemsize], src.numel() * itemsize)
    return True


def _mapped_read(place: Place, host: torch.Tensor, box: Box, first: int, end: int) -> None:
    """Fill ``host`` (contiguous, stored dtype, shape ``box.sizes``) from its box spanning ``[first, end)``."""
    lo = (place.base + first) // _PAGE * _PAGE
    hi = place.base + end
    if os.fstat(place.fd).st_size < hi:  # a mapping past the end would raise SIGBUS; the pread path names it
        raise CheckpointFormatError(f"unexpected end of file before byte {hi} (file truncated while reading?)")
    # private and writable only so torch accepts the buffer; nothing writes to it, so no page is copied
    with mmap.mmap(place.fd, hi - lo, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=lo) as m:
        window = torch.frombuffer(m, dtype=torch.uint8)
        copy_out(window, place.shape, host, box, place.base + first, lo)
        del window  # release the exported buffer before the mapping closes


def _readahead(place: Place, box: Box, itemsize: int) -> None:
    if not hasattr(os, "posix_fadvise"):  # macOS and others: the kernel reads ahead on its own
        return
    first, end, starts, _ = place.span(box, itemsize)
    if len(starts):
        os.posix_fadvise(place.fd, place.base + first, end - first, os.POSIX_FADV_WILLNEED)


def read_box(
    pool: IOPool,
    buf: HostBuffer,
    place: Place,
    dst: torch.Tensor,
    stored_dtype: torch.dtype,
    box: Box,
    mapped: bool = False,
) -> int:
    """Fill ``dst`` (shape ``box.sizes``) from the box's runs, casting from ``stored_dtype`` if needed.

    With ``mapped``, a box of many short runs (column shard) is copied out of read-only file mappings of at
    most ``budget`` bytes of whole rows: the kernel maps cached pages in batches and reads ahead, where one
    ``pread`` per row would pay a system call for each.
    """
    itemsize = stored_dtype.itemsize
    nbytes = dst.numel() * itemsize
    if dst.dtype == stored_dtype and _small_direct(dst, nbytes):
        start = box.single_run(place.shape)
        if start is not None:
            pread_all(place.fd, as_bytes(dst), place.base + start * itemsize)
            return nbytes
    direct = _is_direct(dst) and dst.dtype == stored_dtype
    _, _, starts, run = place.span(box, itemsize)
    use_map = mapped and len(starts) > 1 and run < SMALL_RUN
    step = _step(box.sizes, math.prod(box.sizes[1:]) * itemsize if box.sizes else itemsize, direct, buf.budget)
    if use_map:  # windows are mapped on every I/O thread at once: together they stay within the budget
        step = min(step, span_rows(place.shape, itemsize, buf.budget // pool.threads))
    for r0, n in _row_blocks(box.sizes, step):
        block = _block(dst, r0, n)
        host = block if direct else buf.view(stored_dtype, block.shape, pin=block.is_cuda)
        part = box.rows(r0, n)
        first, end, starts, run = place.span(part, itemsize)
        if use_map and r0 + n < box.sizes[0]:  # start reading the next block's pages while this one is copied
            _readahead(place, box.rows(r0 + n, min(n, box.sizes[0] - r0 - n)), itemsize)
        if use_map and len(starts):
            pool.call(_mapped_read, place, host, part, first, end)
        else:
            _dispatch(pool, pread_all, place.fd, as_bytes(host), place.base, starts, run)
        if not direct:
            pool.drain()
            block.copy_(host)
    return nbytes


# -- ranged reads (object stores) ------------------------------------------------------------------------------

LONG_RUN = 2**20
"""Ranged reads: a box whose runs are at least this long (row shards, whole tensors) is read run by run, in
pieces of at most 32 MiB, straight into the target; a box of many shorter runs (a column shard) is read as the
span of whole rows that covers it and copied out with one strided copy."""
_GAP = 256 * 2**10  # ranged reads: small tensors of one file at most this far apart share one request...
_MERGE = 8 * 2**20  # ... of at most this many bytes

Fetch = Callable[[str, memoryview, int], None]


class _Small(NamedTuple):
    """A small single-run read, held back to be merged with its neighbours in the file."""

    file: str
    offset: int
    nbytes: int
    dst: torch.Tensor
    dtype: torch.dtype


def _fits(dst: torch.Tensor, stored_dtype: torch.dtype) -> bool:
    """Bytes can land in ``dst``'s own memory: a contiguous CPU tensor of the stored dtype."""
    return _is_direct(dst) and dst.dtype == stored_dtype


class RangedReads:
    """Reads boxes of files reached by ranged requests (objects in a store), not file descriptors. Each request
    costs a round trip, so requests are few and large, and the pool's threads keep several in flight.

    ``fetch(file, buffer, offset)`` fills ``buffer`` with the file's bytes from ``offset`` (one request). Every
    thread has one scratch buffer of at most ``budget / threads`` bytes (but one row of the tensor at least).
    Call :meth:`flush` after the last box, then drain the pool. Once a request fails, queued ones are skipped.
    """

    def __init__(self, pool: IOPool, fetch: Fetch, budget: int = DEFAULT_BUDGET):
        self.pool, self.fetch = pool, fetch
        self.window = max(1, budget // pool.threads)
        self.failed = False
        self._small: list[_Small] = []
        self._local = threading.local()

    def read_box(self, file: str, base: int, shape: tuple[int, ...], dst: torch.Tensor, stored_dtype, box: Box) -> int:
        """Queue the reads that fill ``dst`` (shape ``box.sizes``) from the box of the tensor of ``shape`` stored
        from byte ``base`` of ``file``, casting from ``stored_dtype`` if needed. Returns the box's bytes."""
        itemsize = stored_dtype.itemsize
        box.check(shape)
        nbytes = box.nbytes(itemsize)
        if box.empty:
            return 0
        start = box.single_run(shape)
        if start is not None and nbytes < LONG_RUN:  # a small tensor: merged with its neighbours by flush()
            self._small.append(_Small(file, base + start * itemsize, nbytes, dst, stored_dtype))
            return nbytes
        _, _, starts, run = span(shape, box, itemsize)
        direct = _fits(dst, stored_dtype)
        if len(starts) > 1 and run < LONG_RUN:  # a column shard: spans of whole rows, one strided copy each
            step, fn = span_rows(shape, itemsize, self.window if direct else self.window // 2), self._span
        elif direct:
            self._into(file, as_bytes(dst), base, starts, run)
            return nbytes
        else:  # long runs through the scratch buffer (CUDA, non-contiguous, cast), blocks of whole box rows
            step, fn = span_rows(box.sizes, itemsize, self.window) if box.sizes else 1, self._staged
        for r0, n in _row_blocks(box.sizes, step):
            self._submit(fn, file, base, shape, box.rows(r0, n), _block(dst, r0, n), stored_dtype)
        return nbytes

    def flush(self) -> None:
        """Queue the small reads held back so far: neighbours in a file share one request."""
        small, self._small = sorted(self._small, key=lambda s: (s.file, s.offset)), []
        limit = min(_MERGE, self.window)
        group: list[_Small] = []
        end = 0
        for s in small:
            if group and (
                s.file != group[0].file or s.offset > end + _GAP or s.offset + s.nbytes > group[0].offset + limit
            ):
                self._submit(self._merged, group)
                group = []
            end = max(end, s.offset + s.nbytes) if group else s.offset + s.nbytes
            group.append(s)
        if group:
            self._submit(self._merged, group)

    def _submit(self, fn, *args) -> None:
        self.pool.call(self._guarded, fn, *args)

    def _guarded(self, fn, *args) -> None:
        if self.failed:  # another request failed: the load fails with its error, skip the rest
            return
        try:
            fn(*args)
        except BaseException:
            self.failed = True
            raise

    def _scratch(self, nbytes: int) -> torch.Tensor:
        """This thread's scratch buffer, ``nbytes`` long (a view from its storage's first byte)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            self._local.buf = None
            buf = self._local.buf = torch.empty(max(nbytes, self.window), dtype=torch.uint8)
        return buf[:nbytes]

    def _into(self, file: str, mv: memoryview, base: int, starts: np.ndarray, run: int) -> None:
        """Long runs straight into the target's memory ``mv``, in pieces of at most 32 MiB."""
        for k, s in enumerate(starts.tolist()):
            for i in range(0, run, _SPLIT):
                self._submit(self.fetch, file, mv[k * run + i : k * run + min(i + _SPLIT, run)], base + s + i)

    def _staged(self, file: str, base: int, shape, part: Box, block: torch.Tensor, stored_dtype) -> None:
        """The runs of ``part`` back to back into the scratch buffer, then one copy (and cast) into ``block``."""
        _, _, starts, run = span(shape, part, stored_dtype.itemsize)
        buf = self._scratch(len(starts) * run)
        mv = as_bytes(buf)
        for k, s in enumerate(starts.tolist()):
            self.fetch(file, mv[k * run : (k + 1) * run], base + s)
        block.copy_(buf.view(stored_dtype).view(block.shape))

    def _span(self, file: str, base: int, shape, part: Box, block: torch.Tensor, stored_dtype) -> None:
        """The bytes spanning ``part`` (whole rows) in one request, then one strided copy into ``block`` (through
        a host piece of the scratch buffer when ``block`` cannot take the bytes itself)."""
        first, end, _, _ = span(shape, part, stored_dtype.itemsize)
        direct = _fits(block, stored_dtype)
        size = -(-(end - first) // 64) * 64  # the host piece after the span, aligned for any dtype
        buf = self._scratch(size + (0 if direct else part.nbytes(stored_dtype.itemsize)))
        self.fetch(file, as_bytes(buf[: end - first]), base + first)
        host = block if direct else buf[size:].view(stored_dtype).view(block.shape)
        copy_out(buf, shape, host, part, first, first)
        if not direct:
            block.copy_(host)

    def _merged(self, group: list[_Small]) -> None:
        """Neighbouring small tensors of one file: one request for their span, then a copy into each."""
        lo, hi = group[0].offset, max(s.offset + s.nbytes for s in group)
        if len(group) == 1 and _fits(group[0].dst, group[0].dtype):
            self.fetch(group[0].file, as_bytes(group[0].dst), lo)
            return
        buf = self._scratch(hi - lo)
        self.fetch(group[0].file, as_bytes(buf), lo)
        for s in group:
            piece = buf[s.offset - lo : s.offset - lo + s.nbytes]
            if _fits(s.dst, s.dtype):
                as_bytes(s.dst)[:] = as_bytes(piece)
            else:  # a copy of its own: aligned for the dtype view
                s.dst.copy_(piece.clone().view(s.dtype).view(s.dst.shape))
