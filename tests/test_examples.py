"""examples/train_fsdp_cpu.py under torchrun: save every K steps, find a torn save, resume bit for bit.

Run A trains 10 steps and saves at 5 and 10. Directory B then holds what a torn save of step 10 can leave
behind: a complete step 5, a ``step-00000010`` with weight files but no index (copied by hand, or written by
a tool that died) and the staging directory of a save that was killed. Resuming in B must skip both, load
step 5 exactly (checked against a digest of the saved files), and train on to a step-10 checkpoint equal to
A's, tensor for tensor and bit for bit. (tests/test_manager.py kills a real job in the middle of a save.)
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
    return done.stdout + done.stderr


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
def test_train_save_torn_save_resume_continues_bit_for_bit(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    out_a = torchrun("--steps", "10", "--save-every", "5", "--out", str(a))
    assert sorted(p.name for p in a.iterdir()) == ["latest", "step-00000005", "step-00000010"]
    assert os.readlink(a / "latest") == "step-00000010"
    assert sorted(losses(out_a)) == list(range(1, 11))

    shutil.copytree(a / "step-00000005", b / "step-00000005")
    shutil.copytree(a / "step-00000010", b / "step-00000010")
    (b / "step-00000010" / "model.safetensors.index.json").unlink()  # torn: no index
    shutil.copytree(a / "step-00000010", b / ".step-00000010.staging-0123456789ab")  # a killed save's staging

    out_b = torchrun("--steps", "10", "--save-every", "5", "--out", str(b), "--resume", "--digest")
    assert f"skipping {b / 'step-00000010'}" in out_b
    resumed = re.search(r"^resumed from step (\d+) .* params_sha256=(\w+)$", out_b, re.M)
    assert resumed and resumed[1] == "5"
    saved = {k: t for k, t in tensors(a / "step-00000005").items() if not k.startswith("optimizer.")}
    assert resumed[2] == digest(saved)  # the loaded params are the saved ones
    assert losses(out_b) == {s: v for s, v in losses(out_a).items() if s > 5}  # and training goes on alike
    assert_bitwise_equal(tensors(b / "step-00000010"), tensors(a / "step-00000010"))
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg_sq") for k in tensors(b / "step-00000010"))
    state = json.loads((b / "step-00000010" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["world_size"] == 2 and state["param_groups"][0]["lr"] == 1e-2
    assert sorted(p.name for p in b.iterdir()) == ["latest", "step-00000005", "step-00000010"]  # staging swept
