"""``python -m bench.run --quick`` at tiny sizes: every contender runs, and the JSON holds positive numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from bench import names as N

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_smoke(tmp_path):
    out, scratch = tmp_path / "results", tmp_path / "scratch"
    cmd = [
        sys.executable,
        "-m",
        "bench.run",
        "--quick",
        "--warm",
        "--no-warm-up",
        "--world-sizes",
        "2",
        "--layouts",
        "row",
        "--sizes",
        "0.004",
        "--durable-size",
        "0.004",
        "--many-count",
        "200",
        *("--async-gb", "0.004", "--async-series", "2", "--async-idle", "0.05"),  # the async section: tiny
        "--out",
        str(out),
        "--scratch",
        str(scratch),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0

    plain = [c for c in data["cases"] if not c["durable"]]
    durable = [c for c in data["cases"] if c["durable"]]
    assert plain and durable
    for case, save_names, load_names in [(c, N.SAVE, N.LOAD) for c in plain] + [
        (c, N.DURABLE_SAVE, ()) for c in durable
    ]:
        assert set(case["save_summary"]) == set(save_names)
        assert set(case.get("load_summary", {})) == set(load_names)
        for v in list(case["save_summary"].values()) + list(case.get("load_summary", {}).values()):
            assert v["median_s"] > 0 and v["gbps"] > 0 and v["x_bound"] > 0 and v["mem_mb"] >= 0
    many = data["many"]
    assert set(many["save_summary"]) == set(N.MANY_SAVE) and set(many["load_summary"]) == set(N.MANY_LOAD)
    assert all(v["median_s"] > 0 for v in [*many["save_summary"].values(), *many["load_summary"].values()])
    assert "SAVE" in proc.stdout and "LOAD" in proc.stdout and "MANY TENSORS" in proc.stdout
    assert [lay["layout"] for lay in data["async"]["layouts"]] == ["row"]  # details: the test below


def test_bench_async_section_smoke(tmp_path):
    """``--section async`` at a tiny size: every contender measured (or skipped with a reason), ratios filled."""
    from bench import async_bench as A

    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.run", "--section", "async", "--quick", "--async-gb", "0.004", "--layouts"]
    cmd += ["col", "--async-series", "2", "--async-idle", "0.05", "--out", str(out), "--scratch", str(tmp_path / "s")]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())["async"]
    assert [lay["layout"] for lay in data["layouts"]] == ["col"]
    for lay in data["layouts"]:
        assert set(lay["summary"]) | set(data["skipped"]) == set(A.NAMES)
        assert all(reason for reason in data["skipped"].values())
        for name, v in lay["summary"].items():
            assert v["stall_s"]["median"] > 0 and v["rss_all_mb"] >= v["rss_first_mb"] - 1
            assert (v["busy_committed_s"] is not None) == (name in A.ASYNC)
            assert v["slowdown"] is None or name in A.ASYNC
        assert set(lay["ratios"]) == set(A.OURS_ASYNC) - set(data["skipped"])
    assert "ASYNC" in proc.stdout and "ASYNC TARGETS" in proc.stdout


def test_bench_objstore_section_smoke(tmp_path):
    """``--section objstore`` at a few MB, 1 repetition, rows and columns (a local moto server the section starts
    itself): the table prints all three contenders with numbers, and ours direct's objects passed the byte check."""
    from bench import objstore_bench as O

    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.run", "--section", "objstore", "--quick", "--objstore-gb", "0.004"]
    cmd += ["--layouts", "row", "col", "--out", str(out), "--scratch", str(tmp_path / "s")]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())["objstore"]
    assert [lay["layout"] for lay in data["layouts"]] == ["row", "col"]
    for lay in data["layouts"]:
        assert lay["check"]["identical"] and any(name.endswith(".safetensors") for name in lay["check"]["files"])
        assert set(lay["summary"]) == set(O.NAMES)
        for v in lay["summary"].values():
            assert v["s"]["median"] > 0 and v["gbps"]["median"] > 0 and v["mem_mb"] >= 0
        assert len(lay["ratios"]) == 3 and all(value > 0 for value, _, _ in lay["ratios"].values())
    number = r"\d+\.\d+ \(\d+\.\d+-\d+\.\d+\)"  # median (min-max)
    for name in O.NAMES:
        rows = [
            line for line in proc.stdout.splitlines() if re.match(rf"^(row|col)?\s+{name}\s+{number}\s+{number}", line)
        ]
        assert len(rows) == 2, (name, proc.stdout[-3000:])
    assert proc.stdout.count("ours direct: byte-identical to the local save") == 2
    assert "OBJECT STORE TARGETS" in proc.stdout


def test_gpu_check_runs_the_gpu_tests_and_says_when_there_is_no_gpu(monkeypatch, capsys):
    import torch

    from bench import gpu_check

    calls = []
    monkeypatch.setattr(gpu_check, "run_tests", lambda: calls.append("pytest -m gpu") or 0)
    if torch.cuda.is_available():
        monkeypatch.setattr(gpu_check, "timing", lambda gb, reps, out: [f"{gb} GB x {reps}"])
    assert gpu_check.main(["--gb", "0.01", "--reps", "1"]) == 0
    assert calls == ["pytest -m gpu"]
    out = capsys.readouterr().out
    assert ("no CUDA device here" in out) != torch.cuda.is_available()
