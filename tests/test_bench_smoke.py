"""``python -m bench.run --quick`` at tiny sizes: every contender runs, and the JSON holds positive numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import names as N

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_smoke(tmp_path):
    out, scratch = tmp_path / "results", tmp_path / "scratch"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--warm", "--no-warm-up", "--world-sizes", "2",
           "--layouts", "row", "--sizes", "0.004", "--durable-size", "0.004", "--many-count", "200",
           "--out", str(out), "--scratch", str(scratch)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0

    plain = [c for c in data["cases"] if not c["durable"]]
    durable = [c for c in data["cases"] if c["durable"]]
    assert plain and durable
    for case, save_names, load_names in [(c, N.SAVE, N.LOAD) for c in plain] + [(c, N.DURABLE_SAVE, ()) for c in durable]:
        assert set(case["save_summary"]) == set(save_names)
        assert set(case.get("load_summary", {})) == set(load_names)
        for v in list(case["save_summary"].values()) + list(case.get("load_summary", {}).values()):
            assert v["median_s"] > 0 and v["gbps"] > 0 and v["x_bound"] > 0 and v["mem_mb"] >= 0
    many = data["many"]
    assert set(many["save_summary"]) == set(N.MANY_SAVE) and set(many["load_summary"]) == set(N.MANY_LOAD)
    assert all(v["median_s"] > 0 for v in [*many["save_summary"].values(), *many["load_summary"].values()])
    assert "SAVE" in proc.stdout and "LOAD" in proc.stdout and "MANY TENSORS" in proc.stdout
