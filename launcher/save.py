"""Save a sharded model as a Hugging Face checkpoint, every rank writing its own shards in one pass.

    torchrun --nproc-per-node=8 -m launcher.save +model=llama output.dir=/ckpt/step-1000
    torchrun --standalone --nproc-per-node=2 -m launcher.save +model=llama output.dir=$PWD/outputs/demo-llama \
        output.overwrite=replace
    torchrun --nproc-per-node=8 -m launcher.save +model=llama3_8b parallel=fsdp_tp parallel.tp=4 seed=1 \
        output.dir=/ckpt/rand output.max_shard_size=2GB output.dtype=bfloat16
    torchrun --nproc-per-node=8 -m launcher.save +model=llama3_8b source=dcp source.path=/runs/titan/step-1000 \
        output.dir=/ckpt/hf
    torchrun --nproc-per-node=8 -m launcher.save +model=llama output.dir=s3://my-bucket/ckpt/step-1000
    python -m launcher.save +model=tiny output.dir=/tmp/tiny          # one process, no torchrun

Steps: compose the config (Hydra; ``configs/save.yaml``) -> check the world against torchrun's
environment -> choose the device (NVML/CUDA or CPU) -> init the process group (NCCL on GPU, gloo on CPU)
-> build the sharded state from ``source`` (random | dcp | hf) -> ``hf_storage.save`` with ``config.json``
-> rank 0 prints the summary. The run directory (``outputs/save/<torchrun run id>``, or ``$LAUNCHER_RUN_DIR``)
is the same on every rank; only rank 0 writes ``.hydra/`` and ``save.log`` there. It is local also when
``output.dir`` is an object-store URI (``s3://bucket/prefix``; ``source.path`` of ``source=hf`` may be one
too): the URI is checked before the process group starts and handed to ``hf_storage`` as a string, and
the credentials and endpoint come from the standard AWS environment (:mod:`launcher.locations`).

An error the user can fix (``output.dir`` already holds a checkpoint, a missing ``source.path``, a world-size
mismatch, a bad value) ends the app with one line per failing rank and exit status 1, no traceback;
``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import hydra
import torch
from torch.distributed.tensor import DTensor

import hf_storage
from hf_storage import pipeline

from . import config as _config  # noqa: F401  (registers the schemas and resolvers before Hydra composes)
from . import session
from .config import AsyncMode, Overwrite
from .models import dtype_name, hf_config, param_specs, parse_dtype
from .sources import build_state

log = logging.getLogger("launcher.save")


@dataclass(frozen=True)
class SaveReport:
    summary: hf_storage.SaveSummary
    build_seconds: float
    peaks: list[dict] | None  # rank 0 only

    def line(self) -> str:
        s = self.summary
        rate = s.total_bytes / s.seconds / 1e9 if s.seconds > 0 else float("inf")
        text = (
            f"saved {s.tensors} tensors in {s.files} files, {s.total_bytes / 1e9:.3f} GB to {s.path} in "
            f"{s.seconds:.2f} s ({rate:.2f} GB/s); built the state in {self.build_seconds:.2f} s"
        )
        if s.stall_seconds:
            text += f"; async: training would have stood still {s.stall_seconds:.2f} s, the rest ran in the background"
        if s.assembled_bytes:
            text += (
                f"; {s.assembled_bytes / 1e9:.3f} of rank 0's {s.local_bytes / 1e9:.3f} GB went through "
                "row assembly (column shards)"
            )
        return text + ("; " + session.memory_line(self.peaks) if self.peaks else "")


def output_dtype(cfg) -> torch.dtype:
    if cfg.output.dtype is not None:
        return parse_dtype(cfg.output.dtype, "output.dtype")
    return parse_dtype(cfg.model.torch_dtype, "model.torch_dtype")


def bytes_written_here(state: dict[str, DTensor]) -> int:
    """What this rank will write: its pieces of every tensor (replicas once), as the save counts them."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return sum(c.box.nbytes(c.data.element_size()) for n, t in state.items() for c in pipeline.chunks_of(n, t, rank))


def write(cfg, state: dict[str, DTensor], out: str, dtype: torch.dtype, show: bool) -> hf_storage.SaveSummary:
    extra = {"config.json": json.dumps(hf_config(cfg.model, dtype), indent=2) + "\n"}
    options = dict(
        max_shard_size=cfg.output.max_shard_size,
        thread_count=cfg.output.thread_count,
        durable=cfg.output.durable,
        overwrite=cfg.output.overwrite is Overwrite.replace,
        extra_files=extra,
    )
    if cfg.output.async_mode is not AsyncMode.off:  # the caller's view: stall, then the background part
        return hf_storage.async_save(state, out, mode=cfg.output.async_mode.value, **options).result()
    with session.byte_progress(bytes_written_here(state), show, "rank 0 writing") as progress:
        return hf_storage.save(state, out, progress=progress, **options)


def run(cfg) -> SaveReport:
    """The whole save on this rank; returns the report (with every rank's peaks on rank 0)."""
    session.check_config(cfg, session.GROUPS + ("output",))
    session.check_source(cfg)
    out = session.require_location(cfg, "output.dir")  # an s3:// URI stays a string
    dtype = output_dtype(cfg)
    specs = param_specs(cfg.model)
    with session.start(cfg, specs, dtype.itemsize) as s:
        if s.is_rank0:
            log.info(
                "saving %d tensors (%s, source=%s) to %s", len(specs), dtype_name(dtype), cfg.source.kind.value, out
            )
        t0 = time.perf_counter()
        state = build_state(cfg, specs, s.par, dtype, s.place.threads)
        built = time.perf_counter() - t0
        summary = write(cfg, state, out, dtype, s.is_rank0)
        report = SaveReport(summary, built, session.gather_peaks(s.place.device))
    if s.is_rank0:
        log.info(report.line())
    return report


@hydra.main(config_path="../configs", config_name="save", version_base="1.3")
@session.one_line_errors("launcher.save")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
