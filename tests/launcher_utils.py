"""Run the launcher apps as users do (torchrun / python -m) from the tests, and read what they wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def app_env(**extra: str) -> dict[str, str]:
    """This environment without torchrun's variables; tracebacks on (``HYDRA_FULL_ERROR="0"`` turns them off)."""
    env = dict(os.environ)
    for k in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "LAUNCHER_RUN_DIR",
    ):
        env.pop(k, None)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env.update(extra)
    return env


def torchrun_cmd(module: str, nproc: int, *overrides: str, agent: list[str] | None = None) -> list[str]:
    """``torchrun --standalone`` on this host, or with the rendezvous options in ``agent``."""
    launch = agent if agent is not None else ["--standalone"]
    return [str(BIN / "torchrun"), *launch, f"--nproc-per-node={nproc}", "-m", module, *overrides]


def python_cmd(module: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", module, *overrides]


def run(cmd: list[str], cwd: Path, timeout: float = 300, check: bool = True, **env: str):
    out = subprocess.run(cmd, cwd=cwd, env=app_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {out.returncode}\n--- stdout\n{out.stdout[-6000:]}\n"
            f"--- stderr\n{out.stderr[-6000:]}"
        )
    return out


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
