"""A tiny FSDP-sharded training loop on CPU (gloo) that checkpoints in Hugging Face format and resumes.

    torchrun --nproc-per-node=2 examples/train_fsdp_cpu.py --steps 20 --save-every 5 --out /tmp/tiny-run
    torchrun --nproc-per-node=2 examples/train_fsdp_cpu.py --steps 40 --save-every 5 --out /tmp/tiny-run --resume

The parameters are sharded row-wise across the ranks with ``fully_shard`` (FSDP2: DTensor ``Shard(0)``).
Every ``--save-every`` steps all ranks save, each rank writing only the rows it holds:

    OUT/step-000005/optimizer/   AdamW state under the parameter names: ``<name>.exp_avg``, ``<name>.exp_avg_sq``
                                 (sharded like the parameter) and ``<name>.step``, plus optimizer_state.json
    OUT/step-000005/model/       the weights as a standard HF safetensors checkpoint, plus trainer_state.json

safetensors holds tensors only, so the step counter and hyper-parameters go in the JSON files beside them.
Each directory is published atomically by ``hf_storage.save``; the model is saved last and both JSON files
carry the same random tag, so a step whose save was interrupted (or whose two halves come from different
runs) is never resumed from: ``--resume`` takes the newest step whose two halves exist and agree. The data
of step N is a pure function of (seed, N, rank), so a resumed run continues bit for bit like an
uninterrupted one. Resuming at another world size works too (the reader reshards), with other data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import hf_storage

D_IN, D_OUT = 16, 5  # 5 output rows: the last layer's shards are uneven (3 + 2 rows on two ranks)
STEP_DIR = re.compile(r"step-(\d+)")


class TinyMLP(nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.inp = nn.Linear(D_IN, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.inp(x))
        for layer in self.layers:
            x = x + F.gelu(layer(x))
        return self.out(x)


def build(args, world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(args.seed)  # the same full init on every rank; fully_shard keeps each rank's rows
    model = TinyMLP(args.hidden, args.layers)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)


def batch(args, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s data on ``rank``: a fixed nonlinear teacher applied to fresh inputs."""
    teacher = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(args.seed)) / D_IN**0.5
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    x = torch.randn(args.batch, D_IN, generator=g)
    return x, torch.sin(x @ teacher)


def train_step(model, optim, args, step: int, rank: int, world: int) -> float:
    x, y = batch(args, step, rank)
    loss = F.mse_loss(model(x), y)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return (mean / world).item()


# ---------------------------------------------------------------------------------------------- checkpoints


def optimizer_tensors(model, optim) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer state as flat ``<param name>.<key>`` tensors, and its param groups (hyper-parameters)."""
    osd = get_optimizer_state_dict(model, optim)  # creates the state (zero moments) if no step ran yet
    flat = {f"{name}.{key}": t for name, state in osd["state"].items() for key, t in state.items()}
    return flat, osd["param_groups"]


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def save_checkpoint(model, optim, out: Path, step: int, args, world: int) -> Path:
    box = [uuid.uuid4().hex]
    dist.broadcast_object_list(box, src=0)  # one tag for the two halves of this save
    tag, d = box[0], out / f"step-{step:06d}"
    tensors, groups = optimizer_tensors(model, optim)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    hf_storage.save(tensors, d / "optimizer",
                    extra_files={"optimizer_state.json": _json({"tag": tag, "step": step, "param_groups": hyper})})
    state = {"tag": tag, "step": step, "world_size": world, "seed": args.seed, "lr": args.lr}
    hf_storage.save(get_model_state_dict(model), d / "model", extra_files={"trainer_state.json": _json(state)})
    return d


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def complete_step(d: Path) -> int | None:
    """The step saved in ``d`` if both halves were published by the same save, else None."""
    model = _read_json(d / "model" / "trainer_state.json")
    optim = _read_json(d / "optimizer" / "optimizer_state.json")
    if model is None or optim is None or model.get("tag") != optim.get("tag"):
        return None
    return int(model["step"])


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    dirs = [p for p in out.glob("step-*") if STEP_DIR.fullmatch(p.name)] if out.is_dir() else []
    for d in sorted(dirs, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)), reverse=True):
        step = complete_step(d)
        if step is not None:
            return d, step
        print(f"skipping {d}: its save did not complete")
    return None


def load_checkpoint(model, optim, d: Path) -> None:
    """Fill the sharded parameters and optimizer state in place; each rank reads only its own rows."""
    tensors, groups = optimizer_tensors(model, optim)  # first: creating the state runs a zero-lr step
    msd = get_model_state_dict(model)
    hf_storage.load(msd, d / "model")
    set_model_state_dict(model, msd)
    hf_storage.load(tensors, d / "optimizer")
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition(".")
        state.setdefault(name, {})[field] = t
    set_optimizer_state_dict(model, optim, {"state": state, "param_groups": groups})


def params_digest(model) -> str:
    """sha256 over (name, bytes) of every full parameter in name order. Gathers each parameter: tiny models only."""
    h = hashlib.sha256()
    for name, p in sorted(get_model_state_dict(model).items()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        h.update(name.encode())
        h.update(full.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory of the step-NNNNNN checkpoints")
    p.add_argument("--steps", type=int, default=20, help="train until this step (counted from 1)")
    p.add_argument("--save-every", type=int, default=5, help="save after every K-th step (and the last)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--digest", action="store_true",
                   help="print a sha256 of the full parameters after resuming (gathers them: tiny models only)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.save_every < 1:
        p.error(f"--steps ({args.steps}) and --save-every ({args.save_every}) must be at least 1")
    return args


def resume(model, optim, args, rank: int) -> int:
    """Load the newest complete checkpoint (chosen by rank 0 for all) and return its step; 0 if none."""
    box = [latest_checkpoint(args.out) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        if rank == 0:
            print(f"no complete checkpoint in {args.out}: starting from step 0")
        return 0
    d, step = box[0]
    load_checkpoint(model, optim, d)
    digest = params_digest(model) if args.digest else None
    if rank == 0:
        print(f"resumed from step {step} ({d})" + (f" params_sha256={digest}" if digest else ""))
    return step


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        model, optim = build(args, world)
        start = resume(model, optim, args, rank) if args.resume else 0
        for step in range(start + 1, args.steps + 1):
            loss = train_step(model, optim, args, step, rank, world)
            if rank == 0:
                print(f"step {step} loss={loss!r}")
            if step % args.save_every == 0 or step == args.steps:
                d = save_checkpoint(model, optim, args.out, step, args, world)
                if rank == 0:
                    print(f"saved {d}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
