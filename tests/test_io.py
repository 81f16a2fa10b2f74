"""The byte engine (``hf_storage.engine``) alone, one process: every box shape through every path.

Each box is written into a file holding the whole tensor and read back; the file bytes are compared with
the tensor's own bytes, so a misplaced run, a wrong window or a torn block fails. Budgets are tiny so that
windows and staging blocks repeat many times per box.
"""

import os

import pytest
import torch

from hf_storage import engine
from hf_storage.box import Box
from hf_storage.errors import CheckpointFormatError

BOXES = [  # (global shape, offsets, sizes)
    ((64, 48), (0, 16), (64, 16)),  # column shard: one short run per row
    ((64, 48), (8, 0), (40, 48)),  # row shard: one run
    ((63, 47), (32, 20), (31, 27)),  # 2-D block, odd sizes
    ((6, 10, 12), (0, 0, 4), (6, 10, 5)),  # last dimension of a 3-D tensor
    ((6, 10, 12), (2, 3, 0), (3, 4, 12)),  # middle dimension
    ((5,), (1,), (3,)),  # 1-D
    ((), (), ()),  # 0-dim
    ((7, 0), (0, 0), (7, 0)),  # empty
]
DTYPES = [torch.bfloat16, torch.float32, torch.int8, torch.float64]
BASE = 24  # data start in the file: not page aligned, as after a real header


def reference(shape, dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.int64) % 251 - 125).to(dtype).reshape(shape)


def box_of(t: torch.Tensor, offsets, sizes) -> torch.Tensor:
    for d, (o, s) in enumerate(zip(offsets, sizes)):
        t = t.narrow(d, o, s)
    return t


def file_bytes(path, nbytes) -> bytes:
    with open(path, "rb") as f:
        f.seek(BASE)
        return f.read(nbytes)


@pytest.mark.parametrize("mapped", [False, True], ids=["pwrite", "mapped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("box", BOXES, ids=lambda b: f"{b[0]}@{b[1]}")
def test_write_then_read_box(tmp_path, box, dtype, mapped):
    shape, offsets, sizes = box
    full = reference(shape, dtype)
    nbytes = full.numel() * full.element_size()
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(BASE + nbytes)
    src = box_of(full, offsets, sizes).contiguous()
    budget = 256  # a few rows per staging block and per mapped window
    with engine.IOPool(2) as pool:
        fd = os.open(path, os.O_RDWR)
        try:
            n = engine.write_box(
                pool, engine.HostBuffer(budget), engine.Place(fd, BASE, shape), src, Box(offsets, sizes), mapped=mapped
            )
            pool.drain()
        finally:
            os.close(fd)
    assert n == src.numel() * src.element_size()
    stored = torch.frombuffer(bytearray(file_bytes(path, nbytes)) or bytearray(1), dtype=torch.uint8)[:nbytes]
    expect = torch.zeros_like(full)
    box_of(expect, offsets, sizes).copy_(src)
    assert torch.equal(stored, expect.reshape(-1).view(torch.uint8)), "file bytes differ from the box"

    reverse = tuple(reversed(range(len(sizes))))
    transposed = torch.empty(tuple(reversed(sizes)), dtype=dtype).permute(reverse)
    for target in (torch.empty(sizes, dtype=dtype), transposed):
        # a contiguous target is filled in place; a transposed (non-contiguous) one goes through staging
        with engine.IOPool(2) as pool:
            fd = os.open(path, os.O_RDONLY)
            try:
                engine.read_box(
                    pool,
                    engine.HostBuffer(budget),
                    engine.Place(fd, BASE, shape),
                    target,
                    dtype,
                    Box(offsets, sizes),
                    mapped,
                )
                pool.drain()
            finally:
                os.close(fd)
        assert torch.equal(target, src)


@pytest.mark.parametrize("mapped", [False, True], ids=["pread", "mapped"])
def test_read_box_casts_on_the_way(tmp_path, mapped):
    shape, offsets, sizes = (32, 40), (0, 8), (32, 16)
    full = reference(shape, torch.bfloat16)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * BASE + full.reshape(-1).view(torch.uint8).numpy().tobytes())
    target = torch.empty(sizes, dtype=torch.float32)
    with engine.IOPool(3) as pool:
        fd = os.open(path, os.O_RDONLY)
        try:
            engine.read_box(
                pool,
                engine.HostBuffer(300),
                engine.Place(fd, BASE, shape),
                target,
                torch.bfloat16,
                Box(offsets, sizes),
                mapped,
            )
        finally:
            os.close(fd)
    assert torch.equal(target, box_of(full, offsets, sizes).float())


def test_mapped_read_of_a_truncated_file_is_a_named_error(tmp_path):
    """A mapping past the end of the file would kill the process with SIGBUS: the size is checked first."""
    shape, offsets, sizes = (64, 48), (0, 16), (64, 16)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * (BASE + 64 * 48))  # half of the 2-byte tensor
    with engine.IOPool(1) as pool, pytest.raises(CheckpointFormatError, match="unexpected end of file"):
        fd = os.open(path, os.O_RDONLY)
        try:
            engine.read_box(
                pool,
                engine.HostBuffer(),
                engine.Place(fd, BASE, shape),
                torch.empty(sizes, dtype=torch.bfloat16),
                torch.bfloat16,
                Box(offsets, sizes),
                True,
            )
            pool.drain()
        finally:
            os.close(fd)


def test_pool_call_errors_surface_at_drain():
    def boom():
        raise OSError(5, "I/O error")

    pool = engine.IOPool(2)
    pool.call(boom)
    with pytest.raises(OSError, match="I/O error"):
        pool.drain()
    pool.close()
