"""examples/train_fsdp_cpu.py under torchrun: save every K steps, die mid-save, resume bit for bit.

Run A trains 10 steps and saves at 5 and 10. Directory B then holds what a run killed while saving step
10 leaves behind: a complete step 5 and a step 10 whose optimizer half was published but whose model half
never was. Resuming in B must skip the torn step, load step 5 exactly (checked against a digest of the
saved files), and train on to a step-10 checkpoint equal to A's, tensor for tensor and bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_fsdp_cpu.py"


def torchrun(*args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())):
        with safe_open(str(d / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def digest(ts: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(ts):
        h.update(name.encode())
        h.update(ts[name].reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def losses(stdout: str) -> dict[int, str]:
    return {int(m[1]): m[2] for m in re.finditer(r"^step (\d+) loss=(\S+)$", stdout, re.M)}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), f"{k} differs"


@pytest.mark.slow
def test_train_save_kill_resume_continues_bit_for_bit(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    out_a = torchrun("--steps", "10", "--save-every", "5", "--out", str(a))
    assert sorted(p.name for p in a.iterdir()) == ["step-000005", "step-000010"]
    assert sorted(losses(out_a)) == list(range(1, 11))

    (b / "step-000010").mkdir(parents=True)
    shutil.copytree(a / "step-000005", b / "step-000005")
    shutil.copytree(a / "step-000010" / "optimizer", b / "step-000010" / "optimizer")  # torn save

    out_b = torchrun("--steps", "10", "--save-every", "5", "--out", str(b), "--resume", "--digest")
    assert f"skipping {b / 'step-000010'}" in out_b
    resumed = re.search(r"^resumed from step (\d+) .* params_sha256=(\w+)$", out_b, re.M)
    assert resumed and resumed[1] == "5"
    assert resumed[2] == digest(tensors(a / "step-000005" / "model"))  # the loaded params are the saved ones
    assert losses(out_b) == {s: v for s, v in losses(out_a).items() if s > 5}  # and training goes on alike
    for half in ("model", "optimizer"):
        assert_bitwise_equal(tensors(b / "step-000010" / half), tensors(a / "step-000010" / half))
    state = json.loads((b / "step-000010" / "model" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["world_size"] == 2
