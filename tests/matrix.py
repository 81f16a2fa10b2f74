"""The round-trip test matrix as data: placements x dtypes x shapes, and the rank-side workers."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import hf_storage
from hf_storage.dtypes import PACKED, SUPPORTED_DTYPES

SHAPES = {
    "uneven": (7, 5),
    "fewrows": (1, 6),
    "cube": (3, 5, 6),
    "empty": (0, 4),
    "scalar": (),
    "vector": (5,),
}

# name -> (mesh shape or None for the world as a 1-D mesh, placements); Shard(-1) means the last dim.
PLACEMENTS = {
    "rows": (None, ("S0",)),
    "cols": (None, ("S1",)),
    "last": (None, ("S-1",)),
    "repl": (None, ("R",)),
    "2d_rows_cols": ((2, -1), ("S0", "S1")),
    "2d_repl_rows": ((2, -1), ("R", "S0")),
}


def placements_for(world_size: int) -> list[str]:
    return [p for p, (mesh, _) in PLACEMENTS.items() if mesh is None or world_size >= 4]


def reference(name: str, dtype: torch.dtype, shape) -> torch.Tensor:
    """Deterministic random bits (NaN patterns included) of any dtype."""
    g = torch.Generator().manual_seed(hash_name(name))
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).bool().reshape(shape)
    item = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * item,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def hash_name(name: str) -> int:
    h = 1469598103934665603
    for ch in name.encode():
        h = ((h ^ ch) * 1099511628211) % 2**61
    return h


def case_names():
    """Every dtype x shape, but a 0-dim packed dtype (fp4 x2), which no safetensors shape can express."""
    for dt in SUPPORTED_DTYPES:
        for sname, shape in SHAPES.items():
            if dt in PACKED and shape == ():
                continue
            yield f"{str(dt).removeprefix('torch.')}.{sname}", dt, shape


def _placement(code: str, ndim: int):
    if code == "R" or ndim == 0:
        return Replicate()
    d = int(code[1:])
    d = ndim - 1 if d < 0 else d
    return Shard(d) if d < ndim else Replicate()


def make_mesh(world_size: int, pname: str):
    mesh_shape, _ = PLACEMENTS[pname]
    if mesh_shape is None:
        return init_device_mesh("cpu", (world_size,))
    return init_device_mesh("cpu", (mesh_shape[0], world_size // mesh_shape[0]))


def shard(full: torch.Tensor, mesh, pname: str) -> DTensor:
    """A DTensor holding only this rank's piece of ``full``; no collectives."""
    _, codes = PLACEMENTS[pname]
    placements = tuple(_placement(c, full.dim()) for c in codes)
    sizes, offsets = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    local = full
    for d, (o, s) in enumerate(zip(offsets, sizes)):
        local = local.narrow(d, o, s)
    return DTensor.from_local(local.clone(), mesh, placements, shape=full.shape, stride=full.stride(), run_check=False)


def state_dict(mesh, pname: str, *, empty: bool = False) -> dict:
    sd = {}
    for name, dt, shape in case_names():
        full = reference(name, dt, shape)
        if empty:
            full = (
                torch.zeros(full.numel() * full.element_size(), dtype=torch.uint8).view(dt).reshape(shape)
            )  # any dtype
        sd[name] = shard(full, mesh, pname)
    return sd


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def check_local(sd: dict) -> list[str]:
    """Names whose local shard differs from the reference."""
    bad = []
    for name, dt, shape in case_names():
        t = sd[name]
        sizes, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        want = reference(name, dt, shape)
        for d, (o, s) in enumerate(zip(offsets, sizes)):
            want = want.narrow(d, o, s)
        if not same_bits(t.to_local(), want):
            bad.append(name)
    return bad


def save_worker(rank: int, world_size: int, root: str, pnames: list[str]) -> None:
    for p in pnames:
        mesh = make_mesh(world_size, p)
        sd = state_dict(mesh, p)
        hf_storage.save(sd, f"{root}/verb-ws{world_size}-{p}", max_shard_size="4KB")
        dcp_save(
            sd,
            storage_writer=hf_storage.HuggingFaceStorageWriter(
                f"{root}/dcp-ws{world_size}-{p}", max_shard_size="4KB", save_distributed=True
            ),
        )
        dist.barrier()


def load_worker(rank: int, world_size: int, sources: list[str], pnames: list[str]) -> dict:
    """Load every source checkpoint into every placement, by the verb and by DCP; return mismatches."""
    failures = {}
    for src in sources:
        for p in pnames:
            mesh = make_mesh(world_size, p)
            sd = state_dict(mesh, p, empty=True)
            hf_storage.load(sd, src)
            bad = check_local(sd)
            if bad:
                failures[f"verb {src} -> {p}"] = bad
            sd = state_dict(mesh, p, empty=True)
            dcp_load(sd, storage_reader=hf_storage.HuggingFaceStorageReader(src))
            bad = check_local(sd)
            if bad:
                failures[f"dcp {src} -> {p}"] = bad
    return failures
