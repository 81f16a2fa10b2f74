"""Where the weights come from: ``random`` (default), ``dcp`` (torchtitan run) or ``hf`` (existing checkpoint).

    torchrun --nproc-per-node=8 -m launcher.save +model=llama3_8b output.dir=/ckpt/rand seed=1
    torchrun --nproc-per-node=8 -m launcher.save +model=llama3_8b source=dcp source.path=/runs/x/step-1000 \
        output.dir=/ckpt/hf
    torchrun --nproc-per-node=8 -m launcher.save +model=llama3_8b source=hf source.path=/ckpt/hf output.dir=/ckpt/fp32 \
        output.dtype=float32 output.max_shard_size=2GB
    torchrun --nproc-per-node=8 -m launcher.save +model=llama3_8b source=hf source.path=s3://my-bucket/hf \
        output.dir=s3://my-bucket/fp32 output.dtype=float32

``hf`` reads a directory or an ``s3://bucket/prefix`` (a string all the way to ``hf_storage``); ``dcp`` reads a
local directory only.

Every source returns ``{HF name: DTensor}`` in the layout's placements; each rank materialises only its
own shard.

``random``: element ``i`` (row-major global index) of tensor ``name`` is a function of ``(seed, name, i)``
only: a splitmix64 counter hash, computed with int64 tensor ops (wrapping multiply, masked shifts), turned
into a bell-shaped value by summing its four 16-bit fields (Irwin-Hall: exact integers), centred, scaled to
``model.initializer_range`` by one float32 multiply (and shifted by one add for norms), then cast once.
Integer ops and single IEEE roundings give the same bits on any device, box, thread count or world size, so
the same seed gives byte-identical files for any layout. Norm weights are ``1 + noise`` rather than ones,
so every tensor's placement is checked too.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.tensor import DTensor

import hf_storage

from . import titan
from .config import SourceKind
from .dist import Parallel, contiguous_stride
from .models import ParamSpec, head_dim

log = logging.getLogger(__name__)

SLAB_ELEMENTS = 1 << 18  # elements made at a time: each int64 temporary is 2 MiB


class SourceError(ValueError):
    """The source cannot provide the configured model; the message lists every problem and the fix."""


# -------------------------------------------------------------------------------------------------- random

_M64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


_GAMMA = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_BELL_CENTER = 2 * 0xFFFF  # the mean of four 16-bit fields
_BELL_SCALE = 1.0 / math.sqrt(4 * (65536**2 - 1) / 12)  # 1 / their standard deviation


def stream_key(seed: int, name: str) -> int:
    """The splitmix64 start state of tensor ``name`` under ``seed`` (signed int64)."""
    return _signed(int.from_bytes(hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()[:8], "little"))


def _xor_shr(z: torch.Tensor, k: int, tmp: torch.Tensor) -> torch.Tensor:
    """``z ^= z >>> k`` in place (logical shift: torch's >> on int64 is arithmetic)."""
    torch.bitwise_right_shift(z, k, out=tmp)
    return z.bitwise_xor_(tmp.bitwise_and_((1 << (64 - k)) - 1))


def splitmix64(index: torch.Tensor, key: int) -> torch.Tensor:
    """64 random bits (as int64) for each element index of the stream ``key``; consumes ``index``."""
    tmp = torch.empty_like(index)
    z = index.mul_(_GAMMA).add_(_signed(key + _GAMMA))  # state_i = key + (i + 1) * gamma (mod 2^64)
    _xor_shr(z, 30, tmp).mul_(_MIX1)
    _xor_shr(z, 27, tmp).mul_(_MIX2)
    return _xor_shr(z, 31, tmp)


def _f32(x: float) -> float:
    """``x`` rounded to float32, so a float32 multiply gives the same bits whatever precision a kernel uses."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _bell(bits: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Sum of the four 16-bit fields, centred (exact integers), scaled and shifted (two float32 roundings)."""
    total = bits & 0xFFFF
    tmp = torch.empty_like(bits)
    for k in (16, 32, 48):
        total.add_(torch.bitwise_right_shift(bits, k, out=tmp).bitwise_and_(0xFFFF))
    out = total.sub_(_BELL_CENTER).to(torch.float32).mul_(_f32(std * _BELL_SCALE))
    return out.add_(_f32(mean)) if mean else out


def _linear_index(shape, offsets, sizes, device) -> torch.Tensor:
    index = torch.zeros((), dtype=torch.int64, device=device)
    for d, (o, n, st) in enumerate(zip(offsets, sizes, contiguous_stride(tuple(shape)), strict=True)):
        view = [1] * len(sizes)
        view[d] = n
        index = index + (torch.arange(o, o + n, dtype=torch.int64, device=device) * st).reshape(view)
    return index


class Noise(NamedTuple):
    """How random values are drawn: the run's seed, and the mean and standard deviation of the bell."""

    seed: int
    mean: float = 0.0
    std: float = 0.02


def random_box(
    noise: Noise,
    name: str,
    shape,
    offsets,
    sizes,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    workers: int = 1,
) -> torch.Tensor:
    """The box ``(offsets, sizes)`` of the random tensor ``name``, made slab by slab along dim 0.

    ``workers`` threads fill whole slabs each (coarse grains: a stalled thread delays only its slab).
    """
    out = torch.empty(tuple(sizes), dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    key = stream_key(noise.seed, name)
    rows = max(1, SLAB_ELEMENTS // max(1, math.prod(sizes[1:])))

    def fill(r: int) -> None:
        n = min(rows, sizes[0] - r)
        index = _linear_index(shape, (offsets[0] + r, *offsets[1:]), (n, *sizes[1:]), device)
        out[r : r + n] = _bell(splitmix64(index, key), noise.mean, noise.std).to(dtype)

    starts = range(0, sizes[0], rows)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(workers, len(starts))) as pool:
            list(pool.map(fill, starts))
    else:
        for r in starts:
            fill(r)
    return out


def random_local(
    seed: int, spec: ParamSpec, offsets, sizes, std: float, dtype: torch.dtype, device, workers: int = 1
) -> torch.Tensor:
    noise = Noise(seed, 1.0 if spec.init == "norm" else 0.0, std)
    return random_box(noise, spec.name, spec.shape, offsets, sizes, dtype=dtype, device=device, workers=workers)


def random_state(
    seed: int, specs: list[ParamSpec], par: Parallel, std: float, dtype: torch.dtype, workers: int = 1
) -> dict[str, DTensor]:
    state = {}
    for s in specs:
        offsets, sizes = par.local_box(s)
        state[s.name] = par.wrap(random_local(seed, s, offsets, sizes, std, dtype, par.device, workers), s)
    return state


# ------------------------------------------------------------------------------------------- name checks


def check_names(
    found: Mapping[str, tuple[int, ...]], specs: list[ParamSpec], where: str, *, unexpected: bool = True
) -> None:
    """One error naming every missing tensor, shape mismatch and (optionally) unexpected tensor."""
    problems = []
    for s in specs:
        if s.name not in found:
            problems.append(f"{s.name}: missing")
        elif tuple(found[s.name]) != s.shape:
            problems.append(f"{s.name}: shape {list(found[s.name])}, the model needs {list(s.shape)}")
    if unexpected:
        wanted = {s.name for s in specs}
        problems += [f"{n}: not part of the model" for n in sorted(found) if n not in wanted]
    if problems:
        shown = "; ".join(problems[:30]) + (f"; ... ({len(problems) - 30} more)" if len(problems) > 30 else "")
        raise SourceError(
            f"{where} does not match the configured model ({len(problems)} problems): {shown}. "
            "Fix: choose the model that wrote it (+model=..., model.KEY=VALUE) or another path."
        )


def empty_state(specs: list[ParamSpec], par: Parallel, dtypes: Mapping[str, torch.dtype]) -> dict[str, DTensor]:
    """Uninitialised local shards, wrapped as DTensors: targets to load into."""
    state = {}
    for s in specs:
        _, sizes = par.local_box(s)
        state[s.name] = par.wrap(torch.empty(sizes, dtype=dtypes[s.name], device=par.device), s)
    return state


# ------------------------------------------------------------------------------------------------------ hf


def hf_state(
    path: str, specs: list[ParamSpec], par: Parallel, dtype: torch.dtype, thread_count: int = 4
) -> dict[str, DTensor]:
    """Each rank reads its shards of an HF checkpoint, cast to ``dtype`` while reading."""
    ckpt = hf_storage.open_checkpoint(path)
    check_names({n: t.shape for n, t in ckpt.tensors.items()}, specs, f"HF checkpoint {path}")
    state = empty_state(specs, par, {s.name: dtype for s in specs})
    hf_storage.load(state, path, allow_cast=True, thread_count=thread_count)
    return state


# ----------------------------------------------------------------------------------------------------- dcp


class _BoxPlanner(DefaultLoadPlanner):
    """Reads arbitrary boxes ``{fqn: (buffer, global offsets)}`` of a DCP checkpoint into plain buffers."""

    def __init__(self, boxes: Mapping[str, tuple[torch.Tensor, tuple[int, ...]]]):
        super().__init__()
        self.boxes = boxes

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for fqn, (buf, offsets) in self.boxes.items():
            if buf.numel():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.size())
                items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        buf = self.boxes[read_item.dest_index.fqn][0]
        for d, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            buf = buf.narrow(d, o, n)
        return buf

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the buffer: the data is already in place


def _dcp_shapes(metadata, prefix: str, specs: list[ParamSpec], names: titan.TitanNames) -> dict[str, tuple[int, ...]]:
    found = {}
    for s in specs:
        md = metadata.state_dict_metadata.get(prefix + titan.titan_name(s.name, names))
        if isinstance(md, TensorStorageMetadata):
            found[s.name] = tuple(md.size)
    return found


def dcp_state(
    path: str, prefix: str, specs: list[ParamSpec], par: Parallel, model, dtype: torch.dtype
) -> dict[str, DTensor]:
    """Each rank reads from a torchtitan DCP checkpoint only the rows of the heads its shards overlap.

    Either set of torchtitan names is read (:func:`titan.detect` on the checkpoint's metadata keys).
    """
    metadata = FileSystemReader(path).read_metadata()
    names = titan.detect(metadata.state_dict_metadata, prefix)
    check_names(
        _dcp_shapes(metadata, prefix, specs, names),
        specs,
        f"DCP checkpoint {path} ({names.describe()}, key prefix {prefix!r})",
        unexpected=False,
    )
    hd = head_dim(model)
    boxes, wanted = {}, {}
    for s in specs:
        offsets, sizes = par.local_box(s)
        src_off, src_sizes = titan.source_box(s.name, offsets, sizes, hd)
        fqn = prefix + titan.titan_name(s.name, names)
        stored = metadata.state_dict_metadata[fqn].properties.dtype
        boxes[fqn] = (torch.empty(src_sizes, dtype=stored), src_off)
        wanted[s.name] = (fqn, offsets, sizes)
    dcp_load({}, storage_reader=FileSystemReader(path), planner=_BoxPlanner(boxes))
    state = {}
    for s in specs:
        fqn, offsets, sizes = wanted[s.name]
        buf, src_off = boxes[fqn]
        local = titan.hf_rows_from_source(s.name, buf, src_off, offsets, sizes, hd)
        state[s.name] = par.wrap(local.to(device=par.device, dtype=dtype).contiguous(), s)
    return state


# -------------------------------------------------------------------------------------------------- choose


def build_state(cfg, specs: list[ParamSpec], par: Parallel, dtype: torch.dtype, workers: int = 1) -> dict[str, DTensor]:
    """The model state from ``cfg.source``, in ``dtype``, sharded as ``par`` says."""
    kind = SourceKind(cfg.source.kind)
    if kind is SourceKind.random:
        return random_state(cfg.seed, specs, par, cfg.model.initializer_range, dtype, workers)
    if not cfg.source.path:
        raise SourceError(f"source={kind.value} needs source.path=/path/to/checkpoint")
    if kind is SourceKind.hf:
        return hf_state(cfg.source.path, specs, par, dtype, cfg.source.thread_count)
    return dcp_state(cfg.source.path, cfg.source.key_prefix, specs, par, cfg.model, dtype)
