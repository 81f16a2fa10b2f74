"""The whole GPU check in one run (``make gpu-check``), sized to finish within 8 minutes on one GPU.

    1. the GPU tests: NVML placement, the NCCL launcher save/load, CUDA DTensors through async_save
       (thread and process mode) and save/load (``pytest -m gpu``);
    2. a short async timing on CUDA tensors: the stall of ``hf_storage.async_save`` (device-to-host copies
       into pinned host copies) beside a plain ``copy_`` of the same tensors into preallocated pinned
       memory (the floor), and the time until the checkpoint is committed, for ``--gb`` of bf16.

Without CUDA it says so and exits 0 after the (skipped) tests, so the script itself is tested anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def run_tests() -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests"]
    return subprocess.call(cmd)


def timing(gb: float, reps: int, out: str) -> list[str]:
    import torch.distributed as dist

    import hf_storage

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29591", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    n = int(gb * 1e9 / 2 / 8192)
    sd = {f"w{i}": torch.randn(n // 8, 8192, device="cuda").bfloat16() for i in range(8)}
    floor_buf = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in sd.items()}
    rows = []
    for mode in ("thread", "process"):
        floors, stalls, commits = [], [], []
        for rep in range(reps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            for k, v in sd.items():
                floor_buf[k].copy_(v, non_blocking=True)
            torch.cuda.synchronize()
            floor = time.perf_counter() - t0
            t0 = time.perf_counter()
            summary = hf_storage.async_save(sd, f"{out}/{mode}-{rep}", mode=mode).result()
            if rep:
                floors.append(floor)
                stalls.append(summary.stall_seconds)
                commits.append(time.perf_counter() - t0)
        med = statistics.median
        rows.append(
            f"{mode:8s} floor {med(floors):.3f} s  stall {med(stalls):.3f} s "
            f"({med(stalls) / med(floors):.2f}x the floor)  committed {med(commits):.3f} s"
        )
    dist.destroy_process_group()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    rc = run_tests()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; the GPU tests were skipped and no timing was taken")
        return rc
    with tempfile.TemporaryDirectory() as out:
        for row in timing(args.gb, args.reps, out):
            print("gpu-check async:", row)
    return rc


if __name__ == "__main__":
    sys.exit(main())
