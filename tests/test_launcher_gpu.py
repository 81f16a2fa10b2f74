"""The CUDA path on real GPUs: NVML placement, NCCL process group, CUDA DTensors saved and loaded.

Skipped without CUDA. Run on a GPU machine with ``pytest tests/test_launcher_gpu.py -q``. The random init is
made on the GPU there, so equality with a CPU save of the same seed also checks that it is device-independent.
"""

from __future__ import annotations

import pytest
import torch

from launcher import placement
from tests.launcher_utils import files_of, python_cmd, run, torchrun_cmd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and an NVIDIA driver"),
]

TINY = ["+model=tiny", "seed=5", "output.max_shard_size=100KB"]


def test_nvml_and_cuda_agree_on_every_visible_gpu():
    gpus = placement.nvml_gpus()
    visible = placement.cuda_uuids()
    assert gpus and visible and set(visible) <= {g.uuid for g in gpus}
    assert all(g.free_bytes > 0 for g in gpus)


def test_cuda_save_and_load_through_the_launcher(tmp_path):
    nproc = min(2, torch.cuda.device_count())
    gpu_dir, cpu_dir = tmp_path / "gpu", tmp_path / "cpu"
    out = run(torchrun_cmd("launcher.save", nproc, *TINY, "placement=cuda", f"output.dir={gpu_dir}"), cwd=tmp_path)
    text = out.stdout + out.stderr
    assert "device cuda (cuda:nccl,cpu:gloo)" in text and "peak CUDA allocated per rank" in text
    run(
        python_cmd("launcher.save", *TINY, "placement=cpu", f"output.dir={cpu_dir}"),
        cwd=tmp_path,
        LAUNCHER_RUN_DIR=str(tmp_path / "run-cpu"),
    )
    assert files_of(gpu_dir) == files_of(cpu_dir)  # the same bytes from GPU and CPU
    out = run(
        torchrun_cmd(
            "launcher.load",
            nproc,
            "+model=tiny",
            "seed=5",
            "placement=cuda",
            f"source.path={gpu_dir}",
            "compare=random",
        ),
        cwd=tmp_path,
    )
    assert "all 21 tensors equal the random init of seed=5" in out.stdout


def test_throughput_line_on_a_larger_model(tmp_path):
    """Prints the summary of a llama-sized save on every visible GPU (a throughput line for the log)."""
    nproc = torch.cuda.device_count()
    out = run(
        torchrun_cmd(
            "launcher.save",
            nproc,
            "+model=llama",
            "placement=cuda",
            "output.max_shard_size=1GB",
            f"output.dir={tmp_path / 'llama'}",
        ),
        cwd=tmp_path,
    )
    line = next(x for x in out.stdout.splitlines() if "saved" in x and "GB/s" in x)
    print(line)
