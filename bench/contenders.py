"""The save and load contenders of :mod:`bench.run`, and the sharded llama-like state they move.

Each contender is a plain function called on every rank: ``save(state, out_dir, opts)`` or
``load(target, ckpt_dir, opts)``. ``opts`` carries the rank, thread count, durability and file-size policy,
so every contender gets the same knobs where it has them:

* ``thread_count`` is passed to every writer/reader that takes one (torch's included);
* torch's ``HuggingFaceStorageWriter`` hard-codes ``sync_files=True`` (it fsyncs its sharded files); the
  attribute is set to the row's durability so torch is not charged for fsyncs in the non-durable rows;
* raw bounds: save writes each owned local tensor once (one ``write`` per tensor) to a per-rank file, no
  format; load issues one ``preadv`` per contiguous run, straight into the target tensor, with the file
  offsets taken from the checkpoint's headers before the clock starts. Which tensors a rank owns and the
  box its local shard holds come from :mod:`hf_storage.shards` (the exact pieces our writers use), the runs
  from :meth:`hf_storage.box.Box.runs`;
* ``bulk pread + copy (ref)`` is a load reference beside the bound: whole rows in large reads, then a
  strided copy. For column shards it beats the per-run bound (fewer, larger syscalls for more bytes).
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import hf_storage
from hf_storage import shards
from hf_storage.box import Box

from . import names as N
from .models import llama_params


@dataclass(frozen=True)
class Opts:
    rank: int
    world: int
    threads: int
    durable: bool = False
    max_shard_size: str | None = None
    checksums: bool | None = None  # None: our writers' default


def _ours(o: Opts) -> dict:
    """Keyword arguments for this project's writers; ``checksums`` only when set (older versions lack it)."""
    kw: dict = {"thread_count": o.threads, "durable": o.durable, "max_shard_size": o.max_shard_size}
    if o.checksums is not None:
        kw["checksums"] = o.checksums
    return kw


# -- state ---------------------------------------------------------------------------------------
def mesh_for(layout: str, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    if layout == "2d":
        if world % 2 or world < 4:
            raise ValueError(f"the 2d layout needs an even world size >= 4, got {world}")
        return init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    return init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))


def placements_for(layout: str, ndim: int) -> list:
    """row: Shard(0) on a 1-D mesh; col: Shard(1) (norms replicated); 2d: [Shard(0), Shard(1)]."""
    if layout == "row":
        return [Shard(0)]
    if layout == "col":
        return [Shard(1)] if ndim > 1 else [Replicate()]
    if layout == "2d":
        return [Shard(0), Shard(1) if ndim > 1 else Replicate()]
    raise ValueError(f"unknown layout {layout!r}; choose from {N.LAYOUTS}")


def make_dtensor(shape, dtype, mesh, placements, fill: Callable[[torch.Tensor, int], None], key: int) -> DTensor:
    """A DTensor whose local piece is filled by ``fill(local, seed)``; replicas get the same seed."""
    sizes, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    local = torch.empty(sizes, dtype=dtype)
    fill(local, hash((key, tuple(offsets))) % 2**62)
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def llama_state(cfg: dict, layout: str, mesh, *, zeros: bool = False, seed: int = 0) -> dict[str, DTensor]:
    """The sharded bf16 state of a llama-like config; random values (or zeros, for load targets)."""

    def fill(t: torch.Tensor, key: int) -> None:
        if zeros:
            t.zero_()
        else:
            gen = torch.Generator().manual_seed(seed * 7919 + key)
            t.copy_(torch.randint(-(2**15), 2**15, t.shape, dtype=torch.int16, generator=gen).view(torch.bfloat16))

    return {
        p.name: make_dtensor(p.shape, torch.bfloat16, mesh, placements_for(layout, len(p.shape)), fill, i)
        for i, p in enumerate(llama_params(cfg))
    }


def many_tensor_state(count: int, mesh, *, zeros: bool = False) -> dict[str, DTensor]:
    """``count`` fp32 8x8 DTensors, rows sharded over the mesh (issue 6's MoE-style case)."""

    def fill(t: torch.Tensor, key: int) -> None:
        t.zero_() if zeros else t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape) + key % 1000)

    return {f"experts.{i}.weight": make_dtensor((8, 8), torch.float32, mesh, [Shard(0)], fill, i) for i in range(count)}


def local_box(t: DTensor) -> tuple[torch.Tensor, Box]:
    """This rank's local shard and the box of the global tensor it holds (``hf_storage.shards``: one piece for
    the Shard / Replicate layouts benchmarked here)."""
    held = shards.of(t)
    if len(held.pieces) != 1:
        raise NotImplementedError(f"the raw bounds take one box per local shard; this one has {len(held.pieces)}")
    return held.data, held.pieces[0].box


def owns(t: DTensor) -> bool:
    """Replicated data is written once, by mesh coordinate 0 of each replicated mesh dimension (as our writers)."""
    return shards.of(t).writes


def local_bytes(state: dict[str, DTensor]) -> int:
    return sum(t.to_local().numel() * t.element_size() for t in state.values())


def total_bytes(state: dict[str, DTensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# -- helpers -------------------------------------------------------------------------------------
def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


def _write_all(fd: int, buf: memoryview) -> None:
    while buf:
        buf = buf[os.write(fd, buf) :]


def _fsync_tree(path: str) -> None:
    for name in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        if os.path.isfile(name):
            fd = os.open(name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


# -- save contenders -----------------------------------------------------------------------------
def save_raw(state, out: str, o: Opts) -> None:
    """The bound: this rank's owned bytes, one write per tensor, into its own file (+ fsync if durable)."""
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, f"rank{o.rank:05d}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in state.values():
            if owns(t):
                _write_all(fd, _as_bytes(t.to_local()))
        if o.durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def save_hf(state, out: str, o: Opts) -> None:
    hf_storage.save(state, out, **_ours(o))


def save_hf_dcp(state, out: str, o: Opts) -> None:
    writer = hf_storage.HuggingFaceStorageWriter(out, **_ours(o))
    dcp.save(state, storage_writer=writer)


def save_torch_hf(state, out: str, o: Opts) -> None:
    writer = dcp.HuggingFaceStorageWriter(
        out,
        thread_count=o.threads,
        save_distributed=True,
        enable_consolidation=True,
        thread_count_consolidation=o.threads,
    )
    writer.sync_files = o.durable
    dcp.save(state, storage_writer=writer)


def save_torch_fs(state, out: str, o: Opts) -> None:
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out, thread_count=o.threads, sync_files=o.durable))


def save_gather(state, out: str, o: Opts) -> None:
    """Gather every tensor to rank 0 (as full_state_dict + cpu_offload does), then one save_file there."""
    from safetensors.torch import save_file

    full = {}
    for name, t in state.items():
        whole = t.full_tensor()
        if o.rank == 0:
            full[name] = whole
        del whole
    if o.rank == 0:
        os.makedirs(out, exist_ok=True)
        save_file(full, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        if o.durable:
            _fsync_tree(out)
    dist.barrier()


# -- load contenders -----------------------------------------------------------------------------
def load_hf(target, ckpt: str, o: Opts) -> None:
    hf_storage.load(target, ckpt, thread_count=o.threads)


def load_hf_dcp(target, ckpt: str, o: Opts) -> None:
    dcp.load(target, storage_reader=hf_storage.HuggingFaceStorageReader(ckpt, thread_count=o.threads))


def load_torch_hf(target, ckpt: str, o: Opts) -> None:
    dcp.load(target, storage_reader=dcp.HuggingFaceStorageReader(ckpt, thread_count=o.threads))


def load_safetensors(target, ckpt: str, o: Opts) -> None:
    """Each rank loads every file whole with safetensors.load_file, then copies out its slices."""
    from safetensors.torch import load_file

    for path in sorted(glob.glob(os.path.join(ckpt, "*.safetensors"))):
        full = load_file(path)
        for name, stored in full.items():
            t = target.get(name)
            if t is None:
                continue
            local, box = local_box(t)
            piece = stored
            for d, (off, n) in enumerate(zip(box.offsets, box.sizes, strict=True)):
                piece = piece.narrow(d, off, n)
            local.copy_(piece)
        del full


def raw_load_plan(ckpt: str) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """name -> (file path, data offset, global shape): what the raw load bound reads before the clock."""
    c = hf_storage.open_checkpoint(ckpt)
    out = {}
    for name, info in c.tensors.items():
        (piece,) = info.chunks
        out[name] = (os.path.join(ckpt, piece.file), piece.begin, info.shape)
    return out


def load_raw(target, ckpt: str, o: Opts, where: dict) -> None:
    """The bound: one preadv per contiguous run of the local box, straight into the target's memory."""
    fds: dict[str, int] = {}
    try:
        for name, t in target.items():
            path, begin, shape = where[name]
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            local, box = local_box(t)
            starts, length = box.runs(shape)
            item = local.element_size()
            run = length * item
            mv = _as_bytes(local)
            fd = fds[path]
            for k, s in enumerate(starts.tolist()):
                if os.preadv(fd, [mv[k * run : (k + 1) * run]], begin + s * item) != run:
                    raise OSError(f"short read in {path}")
    finally:
        for fd in fds.values():
            os.close(fd)


def load_bulk(target, ckpt: str, o: Opts, where: dict, budget: int = 64 * 2**20) -> None:
    """A reference, not a bound: whole rows in one preadv per block of <= ``budget`` bytes, then a strided copy.

    For column shards this trades read amplification (every rank reads full rows) for far fewer syscalls;
    it shows what a reader that coalesces runs could reach. Row shards and 1-D tensors: one preadv.
    """
    fds: dict[str, int] = {}
    scratch = torch.empty(0, dtype=torch.uint8)
    try:
        for name, t in target.items():
            path, begin, shape = where[name]
            fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
            local, box = local_box(t)
            if local.numel() == 0:
                continue
            offsets, sizes = box
            item = local.element_size()
            if len(shape) != 2 or sizes[1] == shape[1]:
                starts, length = box.runs(shape)
                if len(starts) != 1:
                    raise NotImplementedError(f"bulk reference handles 2-D tensors only ({name}: {shape})")
                _pread_all(fd, _as_bytes(local), begin + int(starts[0]) * item)
                continue
            row = shape[1] * item
            step = max(1, budget // row)
            if scratch.numel() < min(step, sizes[0]) * row:
                scratch = torch.empty(min(step, sizes[0]) * row, dtype=torch.uint8)
            for r0 in range(0, sizes[0], step):
                n = min(step, sizes[0] - r0)
                block = scratch[: n * row]
                _pread_all(fd, _as_bytes(block), begin + (offsets[0] + r0) * row)
                rows = block.view(local.dtype).view(n, shape[1])
                local[r0 : r0 + n].copy_(rows[:, offsets[1] : offsets[1] + sizes[1]])
    finally:
        for fd in fds.values():
            os.close(fd)


def _pread_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise OSError(f"unexpected end of file at {offset}")
        buf, offset = buf[n:], offset + n


SAVE = dict(zip(N.SAVE, (save_raw, save_hf, save_hf_dcp, save_torch_hf, save_torch_fs, save_gather), strict=True))
LOAD = dict(zip(N.LOAD, (load_raw, load_hf, load_hf_dcp, load_torch_hf, load_safetensors, load_bulk), strict=True))
