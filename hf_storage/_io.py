"""Byte movement between tensors and safetensors files: ``pwrite``/``preadv`` of contiguous runs.

A *box* is a chunk of a row-major tensor stored at ``base`` in a file (global ``shape``, ``offsets``,
``sizes``). Its bytes are a set of contiguous runs (:func:`hf_storage.layout.chunk_runs`): one for a
row shard, one per row for a column shard. CPU tensors that are contiguous are written from / read into
their own memory; anything else (CUDA, non-contiguous views, a dtype cast on load) goes through a
staging buffer of at most ``budget`` bytes, one block of leading-dimension rows at a time.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .checksum import Accumulator
from .errors import CheckpointFormatError
from .layout import chunk_runs

DEFAULT_BUDGET = 64 * 2**20
_SPLIT = 32 * 2**20  # large runs are cut into pieces of this size so threads share them
_BATCH = 4 * 2**20  # small runs are grouped into batches of about this many bytes


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
    """Runs run-batches on ``threads`` threads (inline when 1). ``drain`` waits and re-raises."""

    def __init__(self, threads: int = 1):
        if threads < 1:
            raise ValueError(f"thread_count must be >= 1, got {threads}")
        self._ex = ThreadPoolExecutor(threads, thread_name_prefix="hf_storage-io") if threads > 1 else None
        self._pending: list[Future] = []

    def submit(self, fn, fd: int, ops: list[tuple[memoryview, int]]) -> None:
        if self._ex is None:
            _run_ops(fn, fd, ops)
        else:
            self._pending.append(self._ex.submit(_run_ops, fn, fd, ops))

    def drain(self) -> None:
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        for e in errors:
            if e is not None:
                raise e

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self._ex is not None:
                self._ex.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _run_ops(fn, fd: int, ops: list[tuple[memoryview, int]]) -> None:
    for buf, offset in ops:
        fn(fd, buf, offset)


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


def _row_blocks(sizes: tuple[int, ...], row_bytes: int, direct: bool, budget: int):
    """Split the leading dimension into blocks that fit the staging budget (one block if direct)."""
    if not sizes:
        yield 0, 1
        return
    rows = sizes[0]
    step = rows if direct else max(1, budget // max(row_bytes, 1))
    for r0 in range(0, rows, max(step, 1)):
        yield r0, min(step, rows - r0)


def _is_direct(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous()


def _block(t: torch.Tensor, r0: int, n: int) -> torch.Tensor:
    return t if t.dim() == 0 else t.narrow(0, r0, n)


def _sub_box(offsets, sizes, r0: int, n: int):
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
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self._buf is None or self._buf.numel() < nbytes:
            pin = torch.cuda.is_available()
            self._buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        return self._buf[:nbytes].view(dtype).view(tuple(shape))


def write_box(pool: IOPool, staging: Staging, fd: int, src: torch.Tensor, base: int,
              shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...],
              crc: Accumulator | None = None) -> int:
    """Write ``src`` (the box's data, shape ``sizes``) into its runs. Returns bytes written.

    With ``crc``, the runs are also folded into that checksum accumulator while the writes proceed.
    """
    direct = _is_direct(src)
    itemsize = src.element_size()
    row_bytes = src[0].numel() * itemsize if src.dim() and src.shape[0] else 0
    written = 0
    for r0, n in _row_blocks(sizes, row_bytes, direct, staging.budget):
        block = _block(src, r0, n)
        if not direct:
            pool.drain()  # the staging buffer is about to be reused
            host = staging.view(block.dtype, block.shape)
            host.copy_(block)
            block = host
        off, sz = _sub_box(offsets, sizes, r0, n)
        starts, length = chunk_runs(shape, off, sz)
        mv = as_bytes(block)
        _dispatch(pool, pwrite_all, fd, mv, base, starts, length * itemsize, itemsize)
        if crc is not None:
            crc.add_runs(mv, (starts * itemsize).tolist(), length * itemsize)
        written += block.numel() * itemsize
    if not direct:
        pool.drain()
    return written


def read_box(pool: IOPool, staging: Staging, fd: int, dst: torch.Tensor, stored_dtype: torch.dtype, base: int,
             shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """Fill ``dst`` (shape ``sizes``) from the box's runs, casting from ``stored_dtype`` if needed."""
    direct = _is_direct(dst) and dst.dtype == stored_dtype
    itemsize = torch.empty((), dtype=stored_dtype).element_size()
    numel_row = dst[0].numel() if dst.dim() and dst.shape[0] else 0
    nread = 0
    for r0, n in _row_blocks(sizes, numel_row * itemsize, direct, staging.budget):
        block = _block(dst, r0, n)
        host = block if direct else staging.view(stored_dtype, block.shape)
        off, sz = _sub_box(offsets, sizes, r0, n)
        starts, length = chunk_runs(shape, off, sz)
        _dispatch(pool, pread_all, fd, as_bytes(host), base, starts, length * itemsize, itemsize)
        if not direct:
            pool.drain()
            block.copy_(host)
        nread += host.numel() * itemsize
    return nread
