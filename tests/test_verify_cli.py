"""``python -m hf_storage verify|inspect``: exit codes, report and table contents."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hf_storage
from hf_storage.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    sd = {
        "model.embed.weight": torch.randn(32, 8),
        "model.layers.0.mlp.w": torch.randn(8, 16).bfloat16(),
        "model.layers.1.mlp.w": torch.randn(8, 16).bfloat16(),
        "lm_head.bias": torch.zeros(32, dtype=torch.int64),
    }
    path = tmp_path / "ckpt"
    hf_storage.save(sd, path, max_shard_size=600, thread_count=1)
    return path


def corrupt(path: Path, tensor: str) -> None:
    (chunk,) = hf_storage.open_checkpoint(path).tensors[tensor].chunks
    with open(path / chunk.file, "r+b") as f:
        f.seek(chunk.begin + 5)
        b = f.read(1)
        f.seek(chunk.begin + 5)
        f.write(bytes([b[0] ^ 0x04]))


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "hf_storage", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def run_module_here(monkeypatch, *args: str) -> int:
    """``python -m hf_storage ARGS`` without paying for a fresh interpreter (torch import): same entry path."""
    monkeypatch.setattr(sys, "argv", ["hf_storage", *args])
    monkeypatch.delitem(sys.modules, "hf_storage.__main__", raising=False)  # run it fresh, as -m does
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("hf_storage", run_name="__main__", alter_sys=True)
    return exit_info.value.code


def test_python_m_verify_exit_codes(ckpt: Path, monkeypatch, capsys):
    assert run_module_here(monkeypatch, "verify", str(ckpt)) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK: 0 problems, 0 warnings")
    corrupt(ckpt, "model.layers.1.mlp.w")
    assert run_module_here(monkeypatch, "verify", str(ckpt)) == 1
    # and once for real, in a separate interpreter
    bad = run_module("verify", str(ckpt))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "PROBLEM" in bad.stdout and "tensor 'model.layers.1.mlp.w'" in bad.stdout and "CRC-32" in bad.stdout
    assert "FAILED: 1 problems" in bad.stdout


def test_verify_in_process_and_no_checksums(ckpt: Path, capsys):
    corrupt(ckpt, "lm_head.bias")
    assert main(["verify", str(ckpt)]) == 1
    assert "tensor 'lm_head.bias'" in capsys.readouterr().out
    assert main(["verify", "--no-checksums", str(ckpt)]) == 0  # structure alone is intact


def test_verify_structural_problem(ckpt: Path, capsys):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.embed.weight"] = "../elsewhere.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["verify", str(ckpt)]) == 1
    assert "outside the checkpoint directory" in capsys.readouterr().out


def test_strict_fails_on_warnings(tmp_path: Path, capsys):
    """A plain safetensors file (no index, no format metadata) loads, so it only warns; --strict fails it."""
    (tmp_path / "other").mkdir()
    save_file({"w": torch.ones(3)}, str(tmp_path / "other" / "model.safetensors"))
    assert main(["verify", str(tmp_path / "other")]) == 0
    out = capsys.readouterr().out
    assert "warning" in out and "__metadata__.format" in out and "OK: 0 problems, 2 warnings" in out
    assert main(["verify", "--strict", str(tmp_path / "other")]) == 1


def test_inspect_table_and_json(ckpt: Path, capsys):
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    for name in ("model.embed.weight", "model.layers.0.mlp.w", "model.layers.1.mlp.w", "lm_head.bias"):
        assert name in out
    assert "BF16" in out and "[8, 16]" in out and "model-00001-of-" in out
    assert "total: 4 tensors in" in out and f"({32 * 8 * 4 + 2 * 8 * 16 * 2 + 32 * 8} bytes)" in out

    assert main(["inspect", "--json", str(ckpt)]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["tensor"]: r for r in doc["tensors"]}
    assert rows["model.embed.weight"]["shape"] == [32, 8] and rows["model.embed.weight"]["nbytes"] == 1024
    assert doc["total_tensors"] == 4 and doc["total_bytes"] == sum(r["nbytes"] for r in doc["tensors"])
    assert sum(f["tensors"] for f in doc["files"]) == 4


def test_inspect_refuses_a_broken_checkpoint(ckpt: Path, capsys):
    (ckpt / "model.safetensors.index.json").write_text("[]")
    assert main(["inspect", str(ckpt)]) == 1
    assert "weight_map" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate", "x"], ["verify"], ["inspect", "a", "b"], ["verify", "--nope", "x"]]
)
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_missing_directory_is_a_usage_error(tmp_path: Path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
