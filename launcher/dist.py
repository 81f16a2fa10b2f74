"""Process groups, world-size checks, and the device mesh with per-parameter placements of a layout.

    torchrun --nproc-per-node=4 -m launcher.save +model=llama parallel=fsdp_tp output.dir=/ckpt/step-1000

torchrun passes no ``--local-rank``: ranks come from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` and ``GROUP_WORLD_SIZE`` (nodes). Without torchrun the app is one rank of one.

Parallel layouts (``parallel`` group): data-parallel sharding shards every parameter's rows (FSDP:
``Shard(0)`` on mesh dim ``"dp"``); tensor parallelism (mesh dim ``"tp"``) splits the rows of
column-parallel weights (q/k/v/gate/up, embeddings, lm_head: ``Shard(0)``), the columns of row-parallel
weights (o/down: ``Shard(1)``) and replicates norms. With both, the mesh is 2-D ``("dp", "tp")`` and a
column-parallel weight is ``(Shard(0), Shard(0))``: dp splits the rows, tp splits each dp block again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from hf_storage import shards
from hf_storage.box import Box

from .models import ParamSpec


class WorldError(RuntimeError):
    """The launched processes do not match the configured world or parallel layout."""


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None  # None when the launcher did not say
    nnodes: int | None
    torchrun: bool  # started by torchrun (or another launcher that sets RANK / WORLD_SIZE)


def _env_int(env: Mapping[str, str], key: str) -> int | None:
    if key not in env:
        return None
    try:
        return int(env[key])
    except ValueError:
        raise WorldError(
            f"environment variable {key}={env[key]!r} is not an integer; launch with torchrun, which sets it"
        ) from None


def world_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    """This process's place in the job, from torchrun's environment (rank 0 of 1 without it)."""
    env = os.environ if env is None else env
    rank, size = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    if rank is None or size is None:
        return WorldInfo(0, 1, 0, 1, 1, False)
    if not 0 <= rank < size:
        raise WorldError(f"RANK={rank} is outside WORLD_SIZE={size}")
    local = _env_int(env, "LOCAL_RANK")
    return WorldInfo(
        rank,
        size,
        rank if local is None else local,
        _env_int(env, "LOCAL_WORLD_SIZE"),
        _env_int(env, "GROUP_WORLD_SIZE"),
        True,
    )


def check_world(world_cfg, info: WorldInfo) -> None:
    """``world.nnodes x world.nproc_per_node`` must be the launched world; raise naming both and the fix."""
    nnodes, nproc = int(world_cfg.nnodes), int(world_cfg.nproc_per_node)
    if nnodes < 1 or nproc < 1:
        raise WorldError(f"world.nnodes={nnodes} and world.nproc_per_node={nproc} must both be >= 1")
    local_ok = info.local_world_size is None or info.local_world_size == nproc
    if nnodes * nproc == info.world_size and local_ok:
        return
    if info.torchrun:
        launched = f"torchrun started WORLD_SIZE={info.world_size}"
        if info.local_world_size is not None:
            launched += f" (LOCAL_WORLD_SIZE={info.local_world_size} per node)"
    else:
        launched = "this is a single process without torchrun (world size 1)"
    fix_nodes = info.nnodes or max(1, info.world_size // (info.local_world_size or info.world_size))
    fix_nproc = info.local_world_size or info.world_size // fix_nodes
    raise WorldError(
        f"world.nnodes={nnodes} x world.nproc_per_node={nproc} = {nnodes * nproc} ranks, but {launched}. "
        f"Fix: pass world.nnodes={fix_nodes} world.nproc_per_node={fix_nproc} (or world=auto), "
        f"or launch torchrun --nnodes={nnodes} --nproc-per-node={nproc}."
    )


@contextmanager
def process_group(
    info: WorldInfo, backend: str, timeout_s: float, device: torch.device | None = None
) -> Iterator[None]:
    """Initialise the default process group and destroy it on every way out.

    A group that already exists (a test harness made it) is used as is and left alone.
    """
    if dist.is_initialized():
        yield
        return
    kwargs: dict = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if device is not None and device.type == "cuda":
        kwargs["device_id"] = device
    if info.torchrun:
        dist.init_process_group(rank=info.rank, world_size=info.world_size, **kwargs)
    else:
        dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    try:
        yield
        # every rank done before any tears its connections down: a rank that exits first can make gloo
        # abort a peer still finishing its last collective ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ------------------------------------------------------------------------------------------ parallel layout


def resolve_degrees(parallel_cfg, world_size: int, model) -> tuple[int, int]:
    """``(dp, tp)`` with ``dp * tp == world_size``; ``-1`` takes the ranks the other leaves."""
    dp, tp = int(parallel_cfg.dp_shard), int(parallel_cfg.tp)
    if dp == -1 and tp == -1:
        raise WorldError("parallel.dp_shard and parallel.tp are both -1; fix one of them (e.g. parallel.tp=1)")
    if (dp < 1 and dp != -1) or (tp < 1 and tp != -1):
        raise WorldError(f"parallel.dp_shard={dp} and parallel.tp={tp} must be >= 1 or -1 (the ranks left over)")
    if dp == -1:
        dp = world_size // tp
    if tp == -1:
        tp = world_size // dp
    if dp * tp != world_size or dp < 1:
        raise WorldError(
            f"parallel.dp_shard={parallel_cfg.dp_shard} x parallel.tp={parallel_cfg.tp} does not "
            f"divide the world of {world_size} ranks; choose degrees whose product is {world_size} "
            "(or set one to -1)"
        )
    heads = {"num_attention_heads": model.num_attention_heads, "num_key_value_heads": model.num_key_value_heads}
    bad = [f"model.{k}={v}" for k, v in heads.items() if v % tp]
    if bad:
        raise WorldError(
            f"tensor parallel degree {tp} does not divide {' and '.join(bad)}: each TP rank must "
            "hold whole attention heads. Choose parallel.tp among the divisors of the KV head count."
        )
    return dp, tp


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


@dataclass
class Parallel:
    """The device mesh of a layout and where each parameter's shards live on it."""

    mesh: DeviceMesh
    dp: int
    tp: int

    @property
    def device(self) -> torch.device:
        kind = self.mesh.device_type
        return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)

    def placements(self, spec: ParamSpec) -> tuple:
        out = []
        for name in self.mesh.mesh_dim_names:
            if name == "dp":
                out.append(Shard(0))
            else:
                out.append(Replicate() if spec.tp_dim is None else Shard(spec.tp_dim))
        return tuple(out)

    def local_box(self, spec: ParamSpec) -> Box:
        """This rank's shard of ``spec`` (the launcher's layouts hold one block per rank)."""
        (piece,) = shards.pieces_of(tuple(spec.shape), self.mesh, self.placements(spec))
        return piece.box

    def wrap(self, local: torch.Tensor, spec: ParamSpec) -> DTensor:
        return DTensor.from_local(
            local,
            self.mesh,
            self.placements(spec),
            run_check=False,
            shape=torch.Size(spec.shape),
            stride=contiguous_stride(spec.shape),
        )


def local_bytes_estimate(specs: list[ParamSpec], itemsize: int, dp: int, tp: int) -> int:
    """About one rank's share of the state, for memory checks before any process group exists."""
    return sum(math.ceil(s.numel / (dp * (tp if s.tp_dim is not None else 1))) * itemsize for s in specs)


def make_parallel(device_type: str, dp: int, tp: int) -> Parallel:
    dims = [(n, d) for n, d in (("dp", dp), ("tp", tp)) if d > 1] or [("dp", 1)]
    mesh = init_device_mesh(device_type, tuple(d for _, d in dims), mesh_dim_names=tuple(n for n, _ in dims))
    return Parallel(mesh, dp, tp)
