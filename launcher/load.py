"""Load a Hugging Face checkpoint into the configured sharded layout (any world size) and report it.

    torchrun --nproc-per-node=8 -m launcher.load +model=llama source.path=/ckpt/step-1000
    torchrun --standalone --nproc-per-node=1 -m launcher.load +model=llama source.path=$PWD/outputs/demo-llama \
        compare=random
    torchrun --nproc-per-node=4 -m launcher.load +model=llama3_8b parallel=fsdp_tp source.path=/ckpt/x dtype=float32
    torchrun --nproc-per-node=8 -m launcher.load +model=llama source.path=s3://my-bucket/ckpt/step-1000 \
        source.thread_count=16

``source.path`` is a directory or an object-store prefix ``s3://bucket/prefix`` (read with ranged GETs of
each rank's bytes only; credentials and endpoint from the standard AWS environment, :mod:`launcher.locations`).

Each rank builds empty DTensor shards for the model's parameters (``model`` + ``parallel``), checks the
checkpoint's names and shapes against the model (one error lists every missing, unexpected or misshapen
tensor), and reads only the bytes of its own shards. ``compare=random`` then checks every shard against
the random init of ``seed`` (``launcher.save``'s default source): the app exits 1 on any mismatch, with one
line naming the tensors. Every error the user can fix ends the app that way (``HYDRA_FULL_ERROR=1``: the
traceback instead).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import hydra
import torch
from torch.distributed.tensor import DTensor

import hf_storage
from hf_storage.collectives import Group

from . import config as _config  # noqa: F401  (registers the schemas and resolvers before Hydra composes)
from . import session
from .config import Compare, SourceKind
from .dist import Parallel
from .models import ParamSpec, param_specs, parse_dtype
from .sources import check_names, empty_state, random_local

log = logging.getLogger("launcher.load")


class CompareError(RuntimeError):
    """Loaded values differ from the reference."""


@dataclass(frozen=True)
class LoadReport:
    path: str
    tensors: int
    total_bytes: int  # the checkpoint's tensor bytes
    bytes_read: list[int] | None  # per rank, on rank 0
    seconds: float  # slowest rank
    mismatched: list[str]  # names that differ from the reference, from every rank
    peaks: list[dict] | None

    def line(self) -> str:
        read = sum(self.bytes_read or [])
        rate = read / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        text = (
            f"loaded {self.tensors} tensors ({self.total_bytes / 1e9:.3f} GB) from {self.path} in "
            f"{self.seconds:.2f} s; ranks read {read / 1e9:.3f} GB together ({rate:.2f} GB/s)"
        )
        return text + ("; " + session.memory_line(self.peaks) if self.peaks else "")


def target_dtypes(cfg, ckpt, specs: list[ParamSpec]) -> dict[str, torch.dtype]:
    if cfg.dtype is not None:
        dtype = parse_dtype(cfg.dtype, "dtype")
        return {s.name: dtype for s in specs}
    return {s.name: ckpt.tensors[s.name].dtype for s in specs}


def mismatches(cfg, state: dict[str, DTensor], specs: list[ParamSpec], par: Parallel, workers: int = 1) -> list[str]:
    """Names whose local shard differs from the random init of ``cfg.seed`` (in the loaded dtype)."""
    bad = []
    for s in specs:
        local = state[s.name].to_local()
        offsets, sizes = par.local_box(s)
        want = random_local(
            cfg.seed, s, offsets, sizes, cfg.model.initializer_range, local.dtype, local.device, workers
        )
        if not torch.equal(local, want):
            bad.append(s.name)
    return bad


def run(cfg) -> LoadReport:
    """The whole load on this rank; raises :class:`CompareError` on every rank if any rank mismatched."""
    session.check_config(cfg, session.GROUPS)
    path = session.require_dir(cfg, "source.path", session.CHECKPOINT_KINDS[SourceKind.hf])
    compare = cfg.compare is Compare.random
    specs = param_specs(cfg.model)
    ckpt = hf_storage.open_checkpoint(path)
    check_names({n: t.shape for n, t in ckpt.tensors.items()}, specs, f"HF checkpoint {path}")
    dtypes = target_dtypes(cfg, ckpt, specs)
    with session.start(cfg, specs, max(d.itemsize for d in dtypes.values())) as s:
        state = empty_state(specs, s.par, dtypes)
        t0 = time.perf_counter()
        summary = hf_storage.load(state, path, allow_cast=cfg.dtype is not None, thread_count=cfg.source.thread_count)
        seconds = max(Group().all_gather(time.perf_counter() - t0))
        bad = mismatches(cfg, state, specs, s.par, s.place.threads) if compare else []
        every_bad = sorted({n for names in Group().all_gather(bad) for n in names})
        report = LoadReport(
            path,
            summary.tensors,
            ckpt.nbytes(),
            Group().gather(summary.local_bytes),
            seconds,
            every_bad,
            session.gather_peaks(s.place.device),
        )
    if s.is_rank0:
        log.info(report.line())
        if compare and not report.mismatched:
            log.info("compare=random: all %d tensors equal the random init of seed=%s", len(specs), cfg.seed)
    if report.mismatched:
        raise CompareError(
            f"compare=random: {len(report.mismatched)} of {len(specs)} tensors differ from the "
            f"random init of seed={cfg.seed}: {', '.join(report.mismatched[:20])}. Was the "
            "checkpoint saved with another seed, model or output.dtype?"
        )
    return report


@hydra.main(config_path="../configs", config_name="load", version_base="1.3")
@session.one_line_errors("launcher.load", CompareError)
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
