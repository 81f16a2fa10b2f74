"""Writer options: torch-style fqn_to_index_mapping, threads, durability, staging budget, progress."""

from __future__ import annotations

import json

import torch
import torch.distributed.checkpoint as dcp

import hf_storage
from hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter


def state():
    g = torch.Generator().manual_seed(1)
    return {
        "embed.weight": torch.randn(64, 32, generator=g),
        "layers.0.w": torch.randn(32, 48, generator=g).to(torch.bfloat16),
        "layers.1.w": torch.randn(32, 48, generator=g).to(torch.bfloat16),
        "layers.1.mask": torch.rand(5, generator=g) > 0.5,
        "head": torch.randn(33, 32, generator=g).t(),  # non-contiguous source
    }


def test_fqn_to_index_mapping_threads_durable_budget_and_progress(tmp_path):
    sd = state()
    mapping = {"embed.weight": 1, "layers.0.w": 2, "layers.1.w": 2, "layers.1.mask": 2, "head": 1}
    seen = []
    w = HuggingFaceStorageWriter(str(tmp_path / "c"), mapping, 3, durable=True, budget=1024, progress=seen.append)
    dcp.save(sd, storage_writer=w)
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["head"] == "model-00001-of-00002.safetensors"
    assert index["weight_map"]["layers.0.w"] == "model-00002-of-00002.safetensors"
    assert sum(seen) == index["metadata"]["total_size"]
    target = {k: torch.empty_like(v.contiguous()) for k, v in sd.items()}
    dcp.load(target, storage_reader=HuggingFaceStorageReader(str(tmp_path / "c"), thread_count=3, budget=512))
    assert all(torch.equal(sd[k], target[k]) for k in sd)


def test_single_file_checkpoint_without_index(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in state().items()}
    (tmp_path / "s").mkdir()
    save_file(sd, str(tmp_path / "s" / "model.safetensors"), metadata={"format": "pt"})
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    hf_storage.load(target, tmp_path / "s")
    assert all(torch.equal(sd[k], target[k]) for k in sd)


def test_load_into_non_contiguous_targets_and_casts(tmp_path):
    sd = {k: v.contiguous() for k, v in state().items()}
    hf_storage.save(sd, tmp_path / "c", max_shard_size="4KB")
    big = torch.zeros(32, 64)
    target = {"embed.weight": big.t()}  # a strided view: read through the staging buffer
    hf_storage.load(target, tmp_path / "c", strict=False, budget=256)
    assert torch.equal(big.t(), sd["embed.weight"])
    t16 = {"layers.0.w": torch.zeros(32, 48, dtype=torch.float32)}
    hf_storage.load(t16, tmp_path / "c", strict=False, allow_cast=True)
    assert torch.equal(t16["layers.0.w"], sd["layers.0.w"].float())


def test_progress_counts_completed_writes_on_the_calling_thread(tmp_path, monkeypatch):
    """The bar must not run ahead of the disk: every report is at most what the I/O threads have finished."""
    import threading
    import time

    from hf_storage import engine

    real = engine.pwrite_all
    finished = [0]
    lock = threading.Lock()

    def slow_pwrite(fd, buf, offset):
        time.sleep(0.05)
        real(fd, buf, offset)
        with lock:
            finished[0] += len(buf)

    monkeypatch.setattr(engine, "pwrite_all", slow_pwrite)
    monkeypatch.setattr(engine, "_SPLIT", 256 * 1024)  # several ops per tensor
    sd = {f"w{i}": torch.randn(256, 1024) for i in range(3)}  # 1 MiB each
    reports, main = [], threading.get_ident()

    def progress(n):
        with lock:
            reports.append((n, finished[0], threading.get_ident()))

    hf_storage.save(sd, tmp_path / "c", thread_count=2, progress=progress)
    total = sum(t.numel() * 4 for t in sd.values())
    assert sum(n for n, _, _ in reports) == total
    seen = 0
    for n, done, ident in reports:
        seen += n
        assert seen <= done, "progress reported bytes whose writes had not finished"
        assert ident == main
    assert len(reports) > 1
