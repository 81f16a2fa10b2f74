"""A tiny FSDP-sharded training loop on CPU (gloo) that checkpoints in Hugging Face format and resumes.

    torchrun --nproc-per-node=2 examples/train_fsdp_cpu.py --steps 20 --save-every 5 --out /tmp/tiny-run
    torchrun --nproc-per-node=2 examples/train_fsdp_cpu.py --steps 40 --save-every 5 --out /tmp/tiny-run --resume
    torchrun --nproc-per-node=2 examples/train_fsdp_cpu.py --steps 40 --save-every 5 --out /tmp/tiny-async \\
        --async --keep 2

The parameters are sharded row-wise across the ranks with ``fully_shard`` (FSDP2: DTensor ``Shard(0)``).
Checkpoints go through :class:`hf_storage.manager.CheckpointManager`: every ``--save-every`` steps (and at the
last step) all ranks save the whole training state as one Hugging Face checkpoint, each rank writing only the
rows it holds:

    OUT/step-00000005/   the weights under their own names (a standard HF safetensors checkpoint), the AdamW
                         state under ``optimizer.<name>.exp_avg`` / ``.exp_avg_sq`` (sharded like the
                         parameter) and ``optimizer.<name>.step``, and trainer_state.json (step, world size,
                         seed, the optimizer's hyper-parameters: safetensors holds tensors only)
    OUT/latest           a link to the newest complete checkpoint; ``--keep N`` deletes all but the newest N

Model and optimizer state are one save, published by one atomic rename, so they always come from the same
step. A save that was interrupted leaves no ``step-N`` with an index, and ``--resume`` takes the newest
complete one. The data of step N is a pure function of (seed, N, rank), so a resumed run continues bit for
bit like an uninterrupted one. Resuming at another world size works too (the reader reshards), with other data.

With ``--async`` the save only copies each rank's shards to host memory and the files are written on a
background thread while training goes on. Per save the example prints the stall (how long the training loop
stood still), the background seconds and the step-time slowdown while the write ran: the mean time of the
steps that began while the save was writing over the mean time of the steps that began with no save writing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
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

from hf_storage import SaveSummary
from hf_storage.manager import CheckpointManager, step_dir

D_IN, D_OUT = 16, 5  # 5 output rows: the last layer's shards are uneven (3 + 2 rows on two ranks)
OPTIM = "optimizer."  # the prefix of the optimizer state's tensor names
HANG_ENV = "TRAIN_FSDP_CPU_HANG_IN_SAVE"  # tests only: the step whose save hangs once it has written bytes


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


def train_state(model, optim) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The training state as one flat dict of (sharded) tensors: the weights under their own names, the AdamW
    state under ``optimizer.<param name>.<key>``; and the optimizer's param groups (hyper-parameters)."""
    osd = get_optimizer_state_dict(model, optim)  # creates the state (zero moments) if no step ran yet
    flat = {f"{OPTIM}{name}.{key}": t for name, state in osd["state"].items() for key, t in state.items()}
    return {**get_model_state_dict(model), **flat}, osd["param_groups"]


def set_train_state(model, optim, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Put loaded tensors back into the model and the optimizer."""
    set_model_state_dict(model, {k: t for k, t in tensors.items() if not k.startswith(OPTIM)})
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith(OPTIM):
            name, _, field_name = key.removeprefix(OPTIM).rpartition(".")
            state.setdefault(name, {})[field_name] = t
    set_optimizer_state_dict(model, optim, {"state": state, "param_groups": groups})


def trainer_json(step: int, args, world: int, groups: list[dict]) -> str:
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    state = {"step": step, "world_size": world, "seed": args.seed, "lr": args.lr, "param_groups": hyper}
    return json.dumps(state, indent=2, sort_keys=True, default=str) + "\n"


def resume(manager: CheckpointManager, model, optim, args, rank: int) -> int:
    """Load the newest complete checkpoint (chosen by rank 0 for all) and return its step; 0 if none."""
    built: dict = {}

    def targets() -> dict[str, torch.Tensor]:  # only when there is a checkpoint: creating the state steps AdamW
        built["tensors"], built["groups"] = train_state(model, optim)
        return built["tensors"]

    step = manager.load_latest(targets)
    if step is None:
        if rank == 0:
            print(f"no complete checkpoint in {args.out}: starting from step 0")
        return 0
    set_train_state(model, optim, built["tensors"], built["groups"])
    digest = params_digest(model) if args.digest else None
    if rank == 0:
        print(
            f"resumed from step {step} ({args.out / step_dir(step)})" + (f" params_sha256={digest}" if digest else "")
        )
    return step


def params_digest(model) -> str:
    """sha256 over (name, bytes) of every full parameter in name order. Gathers each parameter: tiny models only."""
    h = hashlib.sha256()
    for name, p in sorted(get_model_state_dict(model).items()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        h.update(name.encode())
        h.update(full.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hang_hook(rank: int, saving: list[int]) -> Callable[[int], None] | None:
    """Tests only: with ``TRAIN_FSDP_CPU_HANG_IN_SAVE=N`` the save of step N stops, on every rank, once its
    first bytes are written (a save progress callback), so that a test can kill the job in the middle of it."""
    hang = int(os.environ.get(HANG_ENV, "0"))
    if not hang:
        return None

    def progress(nbytes: int) -> None:
        if saving[0] == hang:
            if rank == 0:
                print(f"writing step {hang}: hanging ({HANG_ENV})", flush=True)
            time.sleep(300)

    return progress


# ------------------------------------------------------------------------------------------- save report


@dataclass
class Pending:
    step: int
    result: Future | SaveSummary
    stall: float
    during: list[float] = field(default_factory=list)  # times of the steps that began while it was writing


class SaveReport:
    """Prints per save: its stall, its background seconds and the step-time slowdown while it was writing."""

    def __init__(self, rank: int):
        self.rank = rank
        self.idle: list[float] = []  # the times of the steps that began with no save writing
        self.pending: Pending | None = None

    def started(self, step: int, result: Future | SaveSummary, stall: float) -> None:
        self.finish()  # the manager settled the previous save before starting this one
        self.pending = Pending(step, result, stall)
        if not isinstance(result, Future):
            self.finish()

    def step(self, seconds: float, writing: bool) -> None:
        (self.pending.during if writing and self.pending else self.idle).append(seconds)
        p = self.pending
        if p is not None and isinstance(p.result, Future) and p.result.done() and p.result.exception() is None:
            self.finish()  # a failed save is raised by the manager, on every rank at once

    def finish(self) -> None:
        p, self.pending = self.pending, None
        if p is None or self.rank != 0:
            return
        if not isinstance(p.result, Future):
            print(f"saved {step_dir(p.step)}: stall {p.stall:.3f} s (synchronous save)", flush=True)
            return
        line = f"saved {step_dir(p.step)}: stall {p.stall:.3f} s, background {p.result.result().seconds:.3f} s, "
        if p.during and self.idle:
            busy, idle = sum(p.during) / len(p.during), sum(self.idle) / len(self.idle)
            line += (
                f"steps while writing {busy * 1e3:.2f} ms vs {idle * 1e3:.2f} ms idle: "
                f"x{busy / idle:.2f} ({len(p.during)} steps)"
            )
        else:
            line += "no step began while it was writing"
        print(line, flush=True)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory of the step-NNNNNNNN checkpoints")
    p.add_argument("--steps", type=int, default=20, help="train until this step (counted from 1)")
    p.add_argument("--save-every", type=int, default=5, help="save after every K-th step (and the last)")
    p.add_argument("--keep", type=int, default=None, help="keep the newest N complete checkpoints (default: all)")
    p.add_argument("--async", dest="async_mode", action="store_true", help="write checkpoints behind training")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument(
        "--digest",
        action="store_true",
        help="print a sha256 of the full parameters after resuming (gathers them: tiny models only)",
    )
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.save_every < 1 or (args.keep is not None and args.keep < 1):
        p.error(f"--steps ({args.steps}), --save-every ({args.save_every}) and --keep ({args.keep}) must be >= 1")
    return args


def train(manager: CheckpointManager, model, optim, args, start: int, saving: list[int]) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    report = SaveReport(rank)
    for step in range(start + 1, args.steps + 1):
        writing, began = manager.in_flight, time.perf_counter()
        loss = train_step(model, optim, args, step, rank, world)
        seconds = time.perf_counter() - began
        if rank == 0:
            print(f"step {step} loss={loss!r}")
        if step > start + 1:  # the first step warms up: not a fair baseline
            report.step(seconds, writing)
        if step % args.save_every != 0 and step != args.steps:
            manager.poll()  # housekeeping of a save that finished, without waiting
            continue
        saving[0] = step
        if rank == 0:
            print(f"saving step {step}", flush=True)
        tensors, groups = train_state(model, optim)
        began = time.perf_counter()
        result = manager.maybe_save(
            step, tensors, {"trainer_state.json": trainer_json(step, args, world, groups)}, force=step == args.steps
        )
        report.started(step, result, time.perf_counter() - began)
    manager.wait()
    report.finish()


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        model, optim = build(args, world)
        saving = [0]  # the step being saved, for the test hook
        manager = CheckpointManager(
            args.out,
            every=args.save_every,
            keep=args.keep,
            async_mode=args.async_mode,
            progress=hang_hook(rank, saving),
        )
        start = resume(manager, model, optim, args, rank) if args.resume else 0
        train(manager, model, optim, args, start, saving)
        dist.barrier()  # no rank tears its connections down while a peer is still in its last collective
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
