"""The README's Python example runs as written (in a temporary directory) and prints what it says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import hf_storage
from launcher.verify import main as launcher_verify

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs_and_prints_what_it_claims(tmp_path):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = block.replace("/tmp/hf-demo", str(tmp_path / "hf-demo"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    claimed = re.search(r"print\(summary.*# (.*)", block).group(1).strip()
    assert out.getvalue().strip() == claimed
    assert hf_storage.open_checkpoint(tmp_path / "hf-demo").index["metadata"]["checksums"]["algorithm"] == "crc32"


def test_launcher_verify_accepts_the_launcher_key_and_reports(tmp_path):
    import torch

    hf_storage.save({"w": torch.arange(10.0)}, tmp_path / "c")
    with contextlib.redirect_stdout(io.StringIO()):
        assert launcher_verify([f"output.dir={tmp_path / 'c'}"]) == 0
    f = next((tmp_path / "c").glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with contextlib.redirect_stdout(io.StringIO()):
        assert launcher_verify([f"source.path={tmp_path / 'c'}"]) == 1
    assert launcher_verify([]) == 2
