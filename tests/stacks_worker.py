"""Rank-side workers for tests/test_training_stacks.py: layouts built by the real torch APIs.

Each layout (FSDP2, TP, FSDP2 over TP, HSDP, ``get_model_state_dict``, hand-made ``_StridedShard`` DTensors)
is saved through ``hf_storage.save`` ("verb"), ``dcp.save`` ("dcp") and ``dcp.async_save`` ("async"), each
with the library's writer; the files are compared bit for bit (plain ``safetensors.torch.load_file``) with
the ``full_tensor()`` of every entry, then loaded back into the same layout, into plain full tensors and
into another layout, through ``hf_storage.load`` and ``dcp.load`` with the library's reader.

One spawn runs every case. Every step runs on every rank and the ranks then agree on its outcome over a
control group, so they stay in lock-step after a failure. Each rank appends the outcome of every step to
``<root>/rank<R>.jsonl`` as it goes: when a step hangs, a watchdog records where and ends the process, and
the test still reports every step that finished. Step ids are ``<layout>-<save path>-<step>``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

import hf_storage
from hf_storage.layout import INDEX_NAME
from tests.matrix import same_bits

GROUP_TIMEOUT = timedelta(seconds=60)  # every group, the default one included: a hang becomes an error
WORLD4_DEADLINE = 150.0  # seconds; the watchdog ends a rank still running then (a normal run: ~20 s)
ASYNC_DEADLINE = 120.0

PATHS = ("verb", "dcp", "async")
STEPS = (
    "save",
    "load_same_verb",
    "load_same_dcp",
    "load_full_verb",
    "load_full_dcp",
    "load_other_verb",
    "load_other_dcp",
)
MODEL_LAYOUTS = ("fsdp2", "fsdp2_no_reshard", "tp", "fsdp_tp", "hsdp", "dsd", "fsdp_tp_unplanned")
# hand-made DTensors on a (2, 2) mesh: name -> placements
STRIDED = {
    "strided_s0_ss0": (Shard(0), _StridedShard(0, split_factor=2)),  # ranks hold rows {0,2},{1,3},{4,6},{5,7}
    "strided_ss0_s0": (_StridedShard(0, split_factor=2), Shard(0)),  # the FSDP2-over-TP layout
    "strided_ss1_s1": (_StridedShard(1, split_factor=2), Shard(1)),
}
# the layout each source is also loaded into ("load_other")
OTHER = {
    "fsdp2": "fsdp_tp",
    "fsdp2_no_reshard": "tp",
    "tp": "hsdp",
    "fsdp_tp": "fsdp2",
    "hsdp": "fsdp_tp",
    "dsd": "dsd_hsdp",
    "fsdp_tp_unplanned": "tp",
    "strided_s0_ss0": "strided_ss0_s0",
    "strided_ss0_s0": "strided_s0_ss0",
    "strided_ss1_s1": "cols_1d",
}
# hand-made layouts: DCP's own planner may refuse them; a save or load through DCP (not one through the
# verbs) may then fail on every rank, with nothing published, instead of succeeding
MAY_REFUSE = set(STRIDED)
STRIDED_SHAPES = {
    "even": ((8, 12), torch.float32),
    "uneven": ((13, 6), torch.bfloat16),
    "uneven_cols": ((5, 13), torch.float32),
    "tiny": ((3, 3), torch.bfloat16),
}

ASYNC_TENSORS = 20
ASYNC_SHAPE = (256, 256)


def world4_ids() -> list[str]:
    layouts = MODEL_LAYOUTS + tuple(STRIDED)
    return [f"{lay}-{p}-{s}" for lay in layouts for p in PATHS for s in STEPS] + [
        f"torch_sanity-{name}" for name in STRIDED
    ]


def async_ids() -> list[str]:
    return ["async_under_load-no_error", "async_under_load-all_reduce_correct", "async_under_load-checkpoint"]


# ---- the model --------------------------------------------------------------------------------------------
VOCAB, DIM, HIDDEN, OUT, EXPERTS = 13, 16, 36, 7, 3  # 13, 7, 3 rows: uneven or empty FSDP/TP shards


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.router = nn.Linear(DIM, EXPERTS, bias=False)  # 3 rows: an empty FSDP shard at 4 ranks

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x)))) + 0.01 * self.router(x).sum(-1, keepdim=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, OUT)
        self.proj = nn.Linear(OUT, OUT)  # sees the replicated logits: the same on every TP rank

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.proj(self.head(self.norm(x)))


TP_PLAN = {
    "emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
    "blocks.*.norm": SequenceParallel(),
    "blocks.*.up": ColwiseParallel(input_layouts=Shard(1)),
    "blocks.*.down": RowwiseParallel(output_layouts=Shard(1)),
    "blocks.*.router": SequenceParallel(use_local_output=True),  # replicated weight, per-token input
    "norm": SequenceParallel(),
    "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    "proj": ColwiseParallel(output_layouts=Replicate()),
}
# a module left out of the TP plan: under FSDP2 its parameters live on the dp submesh only, so each TP rank
# holds an identical copy on its own (sibling) mesh
TP_PLAN_UNPLANNED = {k: v for k, v in TP_PLAN.items() if k != "proj"}


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def _train_step(model: nn.Module) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(_ids()).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _shard_fsdp(model: Net, mesh, reshard: bool = True) -> None:
    for b in model.blocks:
        fully_shard(b, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)


def build_model(kind: str, meshes: dict, seed: int, train: bool) -> Net:
    """A Net parallelized the way ``kind`` names; with ``train``, after one optimizer step (and for
    fsdp2_no_reshard, one more forward, which leaves the parameters unsharded)."""
    torch.manual_seed(seed)
    model = Net()
    if kind in ("fsdp2", "fsdp2_no_reshard"):
        _shard_fsdp(model, meshes["world"], reshard=kind == "fsdp2")
    elif kind == "tp":
        parallelize_module(model, meshes["world"], TP_PLAN)
    elif kind in ("fsdp_tp", "dsd", "fsdp_tp_unplanned"):
        parallelize_module(model, meshes["dp_tp"]["tp"], TP_PLAN_UNPLANNED if kind == "fsdp_tp_unplanned" else TP_PLAN)
        _shard_fsdp(model, meshes["dp_tp"]["dp"])
    elif kind in ("hsdp", "dsd_hsdp"):
        _shard_fsdp(model, meshes["hsdp"])
    else:
        raise ValueError(kind)
    if train:
        _train_step(model)
        if kind == "fsdp2_no_reshard":
            with torch.no_grad():
                model(_ids())
    return model


def model_state(kind: str, model: Net) -> dict:
    if kind.startswith("dsd"):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    return model.state_dict()


# ---- hand-made layouts -----------------------------------------------------------------------------------
def strided_full(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(len(name))
    return {f"{name}.{k}": torch.randn(shape, generator=g).to(dt) for k, (shape, dt) in STRIDED_SHAPES.items()}


def strided_state(name: str, meshes: dict, full: dict[str, torch.Tensor], layout: str | None = None) -> dict:
    """Each rank's piece of ``full`` in ``layout`` (default: ``name``'s), split locally (no collectives)."""
    layout = layout or name
    if layout == "cols_1d":
        mesh, placements = meshes["world"], (Shard(1),)
    else:
        mesh, placements = meshes["plain2d"], STRIDED[layout]
    return {k: distribute_tensor(v, mesh, placements, src_data_rank=None) for k, v in full.items()}


# ---- comparisons ------------------------------------------------------------------------------------------
def expected_local(t, full: torch.Tensor) -> torch.Tensor:
    """What ``t`` (plain or DTensor, any placements) must hold of ``full``: split locally, no collectives."""
    if isinstance(t, DTensor):
        return distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
    return full


def local_of(t) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _rows_differing(got: torch.Tensor, want: torch.Tensor) -> list[int]:
    if got.dim() == 0 or got.shape != want.shape:
        return []
    a = got.contiguous().view(torch.uint8).reshape(got.shape[0], -1) if got.numel() else None
    b = want.contiguous().view(torch.uint8).reshape(want.shape[0], -1) if want.numel() else None
    if a is None:
        return []
    return [i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])]


def compare_locals(target: dict, full: dict[str, torch.Tensor]) -> list[str]:
    bad = []
    for k, want_full in full.items():
        if k not in target:
            bad.append(f"{k}: not in target")
            continue
        got, want = local_of(target[k]), expected_local(target[k], want_full)
        if not same_bits(got, want):
            bad.append(f"{k}: local shard differs (rows {_rows_differing(got, want)[:8]})")
    return bad


def check_files(directory: str, full: dict[str, torch.Tensor]) -> list[str]:
    """The checkpoint read with plain safetensors, against the full tensors, bit for bit."""
    with open(os.path.join(directory, INDEX_NAME)) as f:
        index = json.load(f)
    wm = index["weight_map"]
    problems = []
    if set(wm) != set(full):
        problems.append(f"index keys: missing {sorted(set(full) - set(wm))}, extra {sorted(set(wm) - set(full))}")
    stored: dict[str, torch.Tensor] = {}
    for name in sorted(set(wm.values())):
        stored.update(load_file(os.path.join(directory, name)))
    for k, want in full.items():
        got = stored.get(k)
        if got is None:
            problems.append(f"{k}: not stored")
        elif got.dtype != want.dtype or got.shape != want.shape:
            problems.append(f"{k}: stored {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}")
        elif not same_bits(got, want):
            problems.append(f"{k}: bits differ in rows {_rows_differing(got, want)[:8]}")
    return problems


def full_of(sd: dict) -> dict[str, torch.Tensor]:
    """``full_tensor()`` of every entry (plain tensors as they are); a collective on each DTensor's mesh."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone().contiguous() for k, v in sd.items()}


def scrub(sd: dict) -> None:
    """Overwrite every local shard with a value no real entry holds, so a load that skips bytes shows."""
    with torch.no_grad():
        for v in sd.values():
            loc = local_of(v)
            loc.fill_(float("nan") if loc.is_floating_point() else 0)


# ---- step machinery ---------------------------------------------------------------------------------------
class StepFailed(Exception):
    pass


class Ctx:
    """This rank's recorder, control group and watchdog."""

    def __init__(self, rank: int, root: str, deadline: float):
        self.rank = rank
        self.path = os.path.join(root, f"rank{rank}.jsonl")
        self.current = "start"
        self.ctl = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
        self.start = time.monotonic()
        threading.Thread(target=self._watch, args=(deadline,), daemon=True).start()

    def _watch(self, deadline: float) -> None:
        while time.monotonic() - self.start < deadline:
            time.sleep(0.5)
        self.record(
            self.current,
            False,
            f"rank {self.rank} still in this step after {deadline:.0f}s (hang); watchdog ended the process",
        )
        os._exit(17)

    def record(self, sid: str, ok: bool, msg: str = "", info: str = "") -> None:
        with open(self.path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "id": sid,
                        "ok": ok,
                        "msg": msg,
                        "info": info,
                        "rank": self.rank,
                        "t": round(time.monotonic() - self.start, 2),
                    }
                )
                + "\n"
            )

    def phase(self, fn: Callable[[], object]) -> tuple[object, list]:
        """Run ``fn`` here, then agree with every rank: ``(value, [error or None per rank])``."""
        value, err = None, None
        try:
            value = fn()
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            err = _short(e)
            if os.environ.get("STACKS_TRACE"):
                err += "\n" + traceback.format_exc()
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, err, group=self.ctl)
        return value, errors

    def must(self, fn: Callable[[], object]) -> object:
        value, errors = self.phase(fn)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            raise StepFailed(_ranks_msg(failed, len(errors)))
        return value

    def step(self, sid: str, fn: Callable[..., str | None], *args, **kwargs) -> str | None:
        """A recorded step: ``fn`` raises StepFailed or AssertionError to fail, else returns an info string.
        Returns that info ("" when none), or None when the step failed."""
        self.current = sid
        try:
            info = fn(*args, **kwargs) or ""
        except (StepFailed, AssertionError) as e:
            self.record(sid, False, str(e))
            return None
        self.record(sid, True, info=info)
        return info


def _short(e: BaseException) -> str:
    """The exception's type and message; for DCP's CheckpointException, the first failing rank's cause."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (cause, _) = sorted(e.failures.items(), key=lambda kv: kv[0])[0]
        return f"CheckpointException (ranks {sorted(e.failures)}), rank {rank}: {_short(cause)}"
    return f"{type(e).__name__}: {e}"[:600]


def _ranks_msg(failed: list, world: int) -> str:
    msgs: dict[str, list[int]] = {}
    for r, e in failed:
        msgs.setdefault(e, []).append(r)
    who = "every rank" if len(failed) == world else f"ranks {[r for r, _ in failed]} of {world}"
    return f"failed on {who}: " + " | ".join(f"ranks {rs}: {m}" for m, rs in msgs.items())


def _check_problems(ctx: Ctx, fn: Callable[[], list[str]], what: str = "") -> None:
    """``fn`` returns this rank's problems; fail the step (on every rank) if any rank has one."""
    problems = ctx.must(fn)
    all_problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_problems, problems, group=ctx.ctl)
    bad = {r: p for r, p in enumerate(all_problems) if p}
    if bad:
        r0 = min(bad)
        raise AssertionError(f"{what}mismatch on ranks {sorted(bad)}; rank {r0}: {'; '.join(bad[r0][:6])}")


# ---- saving -----------------------------------------------------------------------------------------------
def save_by(path_kind: str, sd: dict, directory: str, groups: dict) -> None:
    if path_kind == "verb":
        hf_storage.save(sd, directory, process_group=groups["verb"])
    elif path_kind == "dcp":
        dcp.save(sd, storage_writer=hf_storage.HuggingFaceStorageWriter(directory))
    else:
        resp = dcp.async_save(
            sd,
            storage_writer=hf_storage.HuggingFaceStorageWriter(directory),
            process_group=groups["async"],
            async_checkpointer_type=AsyncCheckpointerType.THREAD,
        )
        fut = getattr(resp, "upload_completion", resp)
        fut.result(timeout=GROUP_TIMEOUT.total_seconds())


def load_by(reader: str, sd: dict, directory: str, *, no_dist: bool = False) -> None:
    if reader == "verb":
        hf_storage.load(sd, directory)
    else:
        dcp.load(sd, storage_reader=hf_storage.HuggingFaceStorageReader(directory), no_dist=no_dist)


def save_step(ctx: Ctx, layout: str, path_kind: str, sd: dict, full: dict, directory: str, groups: dict) -> str | None:
    """Saved and bitwise right on every rank; or, where allowed, refused on every rank with nothing published.
    Returns "saved" / "refused: ..." (the info)."""
    _, errors = ctx.phase(lambda: save_by(path_kind, sd, directory, groups))
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        msg = _ranks_msg(failed, len(errors))
        published = os.path.exists(os.path.join(directory, INDEX_NAME))
        if layout in MAY_REFUSE and path_kind != "verb" and len(failed) == len(errors) and not published:
            return "refused: " + msg
        raise StepFailed(msg + (" (and an index was published)" if published else ""))
    _check_problems(ctx, lambda: check_files(directory, full), "the saved files vs full_tensor(): ")
    return "saved; placements " + ", ".join(sorted({_placement_str(v) for v in sd.values()}))


def _placement_str(t) -> str:
    return "(" + ",".join(str(p) for p in t.placements) + ")" if isinstance(t, DTensor) else "plain"


# ---- the world-4 run --------------------------------------------------------------------------------------
def _meshes() -> dict:
    return {
        "world": init_device_mesh("cpu", (4,)),
        "dp_tp": init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")),
        "hsdp": init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard")),
        "plain2d": init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b")),
    }


class Target:
    """A load target: ``fresh()`` scrubs and returns the state dict to load into; ``finish()`` runs after the
    load (for DSD: ``set_model_state_dict``) and returns the state dict to check."""

    def __init__(self, sd_fn, finish=None):
        self.sd_fn, self.finish_fn = sd_fn, finish

    def fresh(self) -> dict:
        sd = self.sd_fn()
        scrub(sd)
        return sd

    def finish(self, sd: dict) -> dict:
        return self.finish_fn(sd) if self.finish_fn else sd


def _model_target(kind: str, meshes: dict) -> Target:
    model = build_model(kind, meshes, seed=2, train=False)
    if kind.startswith("dsd"):

        def finish(sd):
            set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=False))
            return get_model_state_dict(model)

        def sd_fn():
            scrub(model.state_dict())  # the parameters themselves, so set_model_state_dict must bring the data
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))

        return Target(sd_fn, finish)
    return Target(lambda: model_state(kind, model))


def _load_step(
    ctx: Ctx, target: Target, reader: str, directory: str, full: dict, into: str, may_refuse: bool = False
) -> str:
    """Loaded and bitwise right on every rank; or, where allowed (DCP's reader into a layout DCP cannot
    describe), refused on every rank."""
    sd = ctx.must(target.fresh)
    _, errors = ctx.phase(lambda: load_by(reader, sd, directory))
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        if may_refuse and len(failed) == len(errors):
            return "refused: " + _ranks_msg(failed, len(errors))
        raise StepFailed(f"loading into {into}: " + _ranks_msg(failed, len(errors)))
    checked = ctx.must(lambda: target.finish(sd))
    _check_problems(ctx, lambda: compare_locals(checked, full), f"loaded into {into}: ")
    return f"loaded into {into}"


def _dsd_full_step(ctx: Ctx, model: Net, reader: str, directory: str, full: dict) -> str:
    """The broadcast-from-rank-0 path: rank 0 loads a full CPU state dict, set_model_state_dict scatters it."""
    scrub(model.state_dict())
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = ctx.must(lambda: get_model_state_dict(model, options=opts))  # rank 0 only has entries
    if ctx.rank == 0:
        scrub(sd)
    ctx.must(lambda: load_by(reader, sd, directory, no_dist=True) if ctx.rank == 0 else None)
    ctx.must(
        lambda: set_model_state_dict(
            model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
    )
    _check_problems(
        ctx,
        lambda: compare_locals(get_model_state_dict(model), full),
        "rank 0's full CPU state dict, broadcast by set_model_state_dict: ",
    )
    return "loaded on rank 0 into a full CPU state dict, broadcast by set_model_state_dict"


def _build(ctx: Ctx, layout: str, meshes: dict) -> tuple[dict, dict, dict, Net | None]:
    """(state dict to save, the full tensors it must equal, load targets by kind, the DSD broadcast model)."""
    if layout in STRIDED:
        full = strided_full(layout)  # the truth; torch_sanity checks that torch's full_tensor() agrees
        sd = ctx.must(lambda: strided_state(layout, meshes, full))
        blank = {k: torch.empty_like(v) for k, v in full.items()}
        targets = {
            "same": Target(lambda: strided_state(layout, meshes, blank)),
            "other": Target(lambda: strided_state(layout, meshes, blank, OTHER[layout])),
        }
        return sd, full, targets, None
    model = ctx.must(lambda: build_model(layout, meshes, seed=1, train=True))
    sd = ctx.must(lambda: model_state(layout, model))
    full = ctx.must(lambda: full_of(sd))
    targets = {
        "same": ctx.must(lambda: _model_target(layout, meshes)),
        "other": ctx.must(lambda: _model_target(OTHER[layout], meshes)),
    }
    dsd_model = ctx.must(lambda: build_model("dsd", meshes, seed=3, train=False)) if layout == "dsd" else None
    return sd, full, targets, dsd_model


def _run_layout(ctx: Ctx, layout: str, meshes: dict, groups: dict, root: str) -> None:
    ctx.current = f"{layout}-build"
    try:
        sd, full, targets, dsd_model = _build(ctx, layout, meshes)
    except (StepFailed, AssertionError) as e:
        for sid in (f"{layout}-{p}-{s}" for p in PATHS for s in STEPS):
            ctx.record(sid, False, f"building the layout failed: {e}")
        return
    targets.setdefault("full", Target(lambda: {k: torch.empty_like(v) for k, v in full.items()}))
    for path_kind in PATHS:
        directory = os.path.join(root, f"{layout}-{path_kind}")
        saved = ctx.step(f"{layout}-{path_kind}-save", save_step, ctx, layout, path_kind, sd, full, directory, groups)
        for s in STEPS[1:]:
            sid = f"{layout}-{path_kind}-{s}"
            _, which, reader = s.split("_")
            if saved is None:
                ctx.record(sid, False, "not run: the save failed")
            elif saved.startswith("refused"):
                ctx.record(sid, True, info="not applicable: the save was refused on every rank")
            elif which == "full" and dsd_model is not None:
                ctx.step(sid, _dsd_full_step, ctx, dsd_model, reader, directory, full)
            else:
                into = {"same": layout, "other": OTHER[layout], "full": "plain full tensors"}[which]
                ctx.step(
                    sid,
                    _load_step,
                    ctx,
                    targets[which],
                    reader,
                    directory,
                    full,
                    into,
                    may_refuse=reader == "dcp" and into in MAY_REFUSE,
                )


def _torch_sanity_check(ctx: Ctx, meshes: dict, name: str) -> None:
    src = strided_full(name)
    got = ctx.must(lambda: full_of(strided_state(name, meshes, src)))
    bad = [k for k in src if not same_bits(got[k], src[k])]
    assert not bad, f"torch's full_tensor() differs from the source for {bad}"


def _torch_sanity(ctx: Ctx, meshes: dict) -> None:
    """torch itself: full_tensor() of the hand-made DTensors gives back the tensors they were split from."""
    for name in STRIDED:
        ctx.step(f"torch_sanity-{name}", _torch_sanity_check, ctx, meshes, name)


def world4_worker(rank: int, world_size: int, root: str, only: list[str] | None = None) -> str:
    dist.distributed_c10d._set_pg_timeout(GROUP_TIMEOUT)
    ctx = Ctx(rank, root, WORLD4_DEADLINE)
    meshes = _meshes()
    groups = {
        "verb": dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT),
        "async": dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT),
    }
    _torch_sanity(ctx, meshes)
    for layout in MODEL_LAYOUTS + tuple(STRIDED):
        if only is None or layout in only:
            _run_layout(ctx, layout, meshes, groups, root)
    ctx.current = "end"
    return f"done in {time.monotonic() - ctx.start:.1f}s"


# ---- async save under load (world 2) ----------------------------------------------------------------------
def async_under_load_worker(rank: int, world_size: int, root: str) -> str:
    """A training-like loop of all_reduce on the default group while dcp.async_save runs on its own group."""
    dist.distributed_c10d._set_pg_timeout(GROUP_TIMEOUT)
    ctx = Ctx(rank, root, ASYNC_DEADLINE)
    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(7)
    full = {
        f"layers.{i}.w": torch.randn(ASYNC_SHAPE, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
        for i in range(ASYNC_TENSORS)
    }
    sd = {k: distribute_tensor(v, mesh, [Shard(1)], src_data_rank=None) for k, v in full.items()}
    pg = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
    directory = os.path.join(root, "async_under_load")
    ctx.current = "async_under_load-no_error"
    wrong, iters, error = [], 0, None
    try:
        resp = dcp.async_save(
            sd,
            storage_writer=hf_storage.HuggingFaceStorageWriter(directory),
            process_group=pg,
            async_checkpointer_type=AsyncCheckpointerType.THREAD,
        )
        fut = getattr(resp, "upload_completion", resp)
        while True:  # every rank runs the same number of iterations: the done flags travel in the reduction
            x = torch.full((4097,), float(rank + iters))
            x[0] = float(fut.done())
            dist.all_reduce(x)
            want = float(sum(r + iters for r in range(world_size)))
            if not torch.all(x[1:] == want):
                wrong.append(f"iteration {iters}: got {x[1:].unique()[:4].tolist()}, want {want}")
            iters += 1
            if (x[0] == world_size and iters >= 10) or iters >= 100000:
                break
        fut.result(timeout=GROUP_TIMEOUT.total_seconds())
    except (Exception, CheckpointException) as e:
        error = _short(e)
    ctx.record("async_under_load-no_error", error is None, error or "", info=f"{iters} all_reduce iterations")
    ctx.record(
        "async_under_load-all_reduce_correct",
        not wrong and error is None,
        "; ".join(wrong[:5]) or (f"loop ended early: {error}" if error else ""),
    )
    ctx.current = "async_under_load-checkpoint"
    try:
        problems = check_files(directory, full)
    except Exception as e:
        problems = [_short(e)]
    ctx.record("async_under_load-checkpoint", not problems, "; ".join(problems[:6]))
    ctx.current = "end"
    return "done"


# ---- collecting -------------------------------------------------------------------------------------------
def collect(run, fn, world_size: int, root: str, *args, timeout: float) -> tuple[dict, str, float]:
    """Run ``fn`` on ranks; merge the per-rank records: ``({id: record}, spawn error or "", seconds)``.

    A step passes only if every rank that recorded it passed; the message of a failing rank wins."""
    start = time.monotonic()
    err = ""
    try:
        run(fn, world_size, root, *args, timeout=timeout)
    except AssertionError as e:
        err = str(e)[-3000:]
    records: dict[str, dict] = {}
    for r in range(world_size):
        path = os.path.join(root, f"rank{r}.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                cur = records.get(rec["id"])
                if cur is None or (cur["ok"] and not rec["ok"]):
                    records[rec["id"]] = rec
    return records, err, time.monotonic() - start
