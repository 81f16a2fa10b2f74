"""What the apps do around their work: check the config, place the rank, hold the process group, report.

@hydra.main(config_path="../configs", config_name="save", version_base="1.3")
@session.one_line_errors("launcher.save")        # a fixable error: one line per rank, exit status 1
def main(cfg): ...

with session.start(cfg, specs, itemsize) as s:   # world check, device, process group, device mesh
    ...                                          # s.info, s.place, s.par
line = session.memory_line(session.gather_peaks(s.place.device))
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

import hf_storage
from hf_storage.collectives import Group
from hf_storage.verify import human_size

from . import locations, placement
from .config import ConfigError, SourceKind, env_rank  # ConfigError: launcher.session.ConfigError as before
from .dist import (
    Parallel,
    WorldError,
    WorldInfo,
    check_world,
    local_bytes_estimate,
    make_parallel,
    process_group,
    resolve_degrees,
    world_from_env,
)
from .models import ModelConfigError, ParamSpec, check_model
from .sources import SourceError
from .titan import UnknownKeyError

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def options_of(group: str) -> list[str]:
    """The YAML options of a config group (``configs/<group>/*.yaml``)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


GROUPS = ("world", "placement", "parallel", "source")


def check_config(cfg, groups=GROUPS) -> None:
    """A model is chosen and valid, every group the app reads is there, no top-level key was removed.

    Types and closed choices were checked at composition by the app's schema (``launcher.config``); what is
    left are the values a schema cannot express: a chosen model, groups or keys deleted with ``~KEY``.
    """
    if "model" not in cfg or cfg.model is None:  # ``in`` is False for a MISSING (``???``) value
        raise ConfigError(
            f"no model chosen: add +model=NAME to the command line, NAME one of "
            f"{', '.join(options_of('model'))} (e.g. +model=llama)"
        )
    check_model(cfg.model)
    gone = [g for g in groups if g not in cfg or cfg[g] is None]
    if gone:
        options = "; ".join(f"{g}={'|'.join(options_of(g))}" for g in gone)
        raise ConfigError(f"the config has no {', '.join(gone)} (removed with ~GROUP?); choose one: {options}")
    if "seed" not in cfg.keys():  # a schema key can still be deleted with ~seed
        raise ConfigError("the config has no seed (removed with ~seed?); pass seed=INT instead")


def require(cfg, key: str, example: str) -> str:
    """The value of the dotted ``key``; a clear error if it is missing (``???``) or empty."""
    node, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, node) if node else cfg
    if parent is None or OmegaConf.is_missing(parent, leaf) or not parent[leaf]:
        raise ConfigError(f"{key} is required: add {key}={example} to the command line")
    return str(parent[leaf])


def require_location(cfg, key: str) -> str:
    """The checkpoint the dotted ``key`` names: an ``s3://bucket/prefix`` URI (checked, kept a string) or an
    absolute local path (:func:`launcher.locations.resolve`); a clear error if it is unset or malformed."""
    return locations.resolve(key, require(cfg, key, "/path/to/checkpoint"))


def require_dir(cfg, key: str, what: str) -> str:
    """The checkpoint the dotted ``key`` names, to read: an ``s3://`` URI (its form checked; what it holds is
    checked when it is opened, with a one-line error too) or the absolute path of an existing directory."""
    path = require_location(cfg, key)
    if locations.is_uri(path):
        return path
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path} does not exist or is not a directory: pass {key}=DIR of {what}")
    return path


CHECKPOINT_KINDS = {
    SourceKind.hf: "a Hugging Face checkpoint (model.safetensors.index.json + *.safetensors)",
    SourceKind.dcp: "a torch.distributed.checkpoint directory (torchtitan's checkpoint/step-N, with .metadata)",
}


def check_source(cfg) -> str | None:
    """The ``source.path`` of a dcp / hf source (absolute, or an hf source's ``s3://`` URI), checked before any
    process group; None for random."""
    kind = SourceKind(cfg.source.kind)
    if kind is SourceKind.random:
        return None
    path = require_dir(cfg, "source.path", CHECKPOINT_KINDS[kind])
    if kind is SourceKind.dcp and locations.is_uri(path):
        raise ConfigError(
            f"source.path={path} is an object-store URI, but source=dcp reads a local directory: pass "
            f"source.path=DIR of {CHECKPOINT_KINDS[kind]} (s3:// works for source=hf and output.dir)"
        )
    if kind is SourceKind.dcp and not os.path.isfile(os.path.join(path, ".metadata")):
        raise ConfigError(
            f"source.path={path} holds no .metadata file, so it is not a DCP checkpoint: pass "
            f"source.path=DIR of {CHECKPOINT_KINDS[kind]}, or source=hf for an HF checkpoint"
        )
    return path


@dataclass
class Session:
    info: WorldInfo
    place: placement.Placement
    par: Parallel

    @property
    def is_rank0(self) -> bool:
        return self.info.rank == 0


@contextmanager
def start(cfg, specs: list[ParamSpec], itemsize: int) -> Iterator[Session]:
    """Check the world, choose this rank's device, init the process group (destroyed on every exit path)."""
    info = world_from_env()
    check_world(cfg.world, info)
    dp, tp = resolve_degrees(cfg.parallel, info.world_size, cfg.model)
    need = local_bytes_estimate(specs, itemsize, dp, tp)
    place = placement.choose(cfg.placement, info.local_rank, info.local_world_size or 1, need)
    if info.rank == 0:
        log.info(
            "%d rank(s) on %d node(s), device %s (%s), mesh dp=%d tp=%d",
            info.world_size,
            info.nnodes or 1,
            place.device.type,
            place.backend,
            dp,
            tp,
        )
    threads = torch.get_num_threads()
    if place.device.type == "cpu":
        torch.set_num_threads(1)  # parallel work goes to place.threads coarse-grained workers instead
    try:
        with process_group(info, place.backend, float(cfg.world.timeout_s), place.device):
            yield Session(info, place, make_parallel(place.device_type, dp, tp))
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------- errors

# Errors whose message names the cause and the fix: the apps end on them with one line, not a traceback.
FIXABLE: tuple[type[BaseException], ...] = (
    ConfigError,
    ModelConfigError,
    WorldError,
    placement.PlacementError,
    SourceError,
    UnknownKeyError,
    hf_storage.HFStorageError,
)


def full_error() -> bool:
    """``HYDRA_FULL_ERROR=1``: let the exception through, with its traceback (as Hydra does)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def error_line(app: str, e: BaseException) -> str:
    """``launcher.save: CheckpointExistsError: ...``: one line, whatever line breaks the message holds."""
    return f"{app}: {type(e).__name__}: {' '.join(str(e).split()) or '(no message)'}"


def _to_log_files(app: str, line: str) -> None:
    """The line into the run's log file too (rank 0 has one), without printing it a second time."""
    record = logging.LogRecord(app, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def one_line_errors(app: str, *more: type[BaseException]) -> Callable:
    """Decorate an app's main: a fixable error (:data:`FIXABLE` or ``more``) prints one line and exits 1.

    Every rank that fails prints its own line on stderr, prefixed ``[rankN]`` under torchrun: a rank-specific
    cause (a GPU, a node-local path) is never hidden behind rank 0's. ``HYDRA_FULL_ERROR=1`` re-raises instead.
    Put it under ``@hydra.main`` (Hydra finds the config path through ``__wrapped__``).
    """
    fixable = FIXABLE + more

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except fixable as e:
                if full_error():
                    raise
                line = error_line(app, e)
                _to_log_files(app, line)
                where = f"[rank{env_rank()}] " if "RANK" in os.environ else ""  # torchrun started it
                print(where + line, file=sys.stderr, flush=True)
                raise SystemExit(1) from None

        return wrapper

    return decorate


# ------------------------------------------------------------------------------------------------ reporting


@contextmanager
def byte_progress(total: int, enabled: bool, desc: str):
    """A tqdm bar of bytes on rank 0 (hidden when stderr is not a terminal); yields its update callback."""
    if not enabled:
        yield None
        return
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


def peak_memory(device: torch.device) -> dict:
    peaks = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB
    if device.type == "cuda":
        peaks["cuda"] = torch.cuda.max_memory_allocated(device)
    return peaks


def gather_peaks(device: torch.device) -> list[dict] | None:
    return Group().gather(peak_memory(device))


def _per_rank(values: list[int]) -> str:
    if len(values) <= 8:
        return ", ".join(f"r{r} {human_size(v)}" for r, v in enumerate(values))
    worst = max(range(len(values)), key=values.__getitem__)
    median = human_size(int(statistics.median(values)))
    return f"min {human_size(min(values))}, median {median}, max {human_size(values[worst])} (r{worst})"


def memory_line(peaks: list[dict]) -> str:
    line = "peak RSS per rank: " + _per_rank([p["rss"] for p in peaks])
    if all("cuda" in p for p in peaks):
        line += "; peak CUDA allocated per rank: " + _per_rank([p["cuda"] for p in peaks])
    return line
