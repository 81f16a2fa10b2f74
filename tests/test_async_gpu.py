"""Async saves of CUDA tensors: device-to-host copies into pinned host copies (thread mode) and into a
registered shared-memory buffer (process mode), NCCL for the training group, gloo for the background; column
shards staged straight into the node's rows with one strided device-to-host copy per band.

Skipped without CUDA. ``make gpu-check`` runs it with the other GPU tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_storage

from .dist_utils import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and an NVIDIA driver"),
]


def loaded(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in Path(path).glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def nccl_group():
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_save_of_cuda_dtensors_is_bitwise_and_reuses_its_host_copies(nccl_group, tmp_path, mode):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cuda", (1,))
    g = torch.Generator(device="cuda").manual_seed(0)
    full = {
        "rows": torch.randn(256, 128, device="cuda", generator=g).bfloat16(),
        "cols": torch.randn(64, 512, device="cuda", generator=g),
    }
    sd = {
        "rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
        "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
    }
    for step in range(3):
        for t in sd.values():
            t.to_local().add_(1)
        summary = hf_storage.async_save(sd, tmp_path / f"s{step}", mode=mode).result()
        assert summary.stall_seconds > 0
        got = loaded(tmp_path / f"s{step}")
        assert all(torch.equal(got[k], sd[k].full_tensor().cpu()) for k in sd), f"save {step} differs"
    copies = hf_storage.background._SAVER.copies
    assert copies.flat.is_pinned() or mode == "process"


def test_sync_save_and_load_of_cuda_tensors_roundtrip(nccl_group, tmp_path):
    sd = {"w": torch.randn(300, 70, device="cuda"), "b": torch.arange(10, device="cuda")}
    hf_storage.save(sd, tmp_path / "c")
    back = {k: torch.empty_like(v) for k, v in sd.items()}
    hf_storage.load(back, tmp_path / "c")
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_strided_device_to_host_copy_lands_each_row_in_place():
    from hf_storage.engine import copy_rows_from_device

    host = torch.zeros(64, 96, dtype=torch.bfloat16, pin_memory=True)
    src = torch.randn(64, 40, device="cuda").bfloat16()
    assert copy_rows_from_device(host[:, 30:70], src)  # one cudaMemcpy2DAsync: rows of 80 bytes, pitch 192
    torch.cuda.synchronize()
    assert torch.equal(host[:, 30:70], src.cpu())
    assert torch.count_nonzero(host[:, :30]) == 0 and torch.count_nonzero(host[:, 70:]) == 0
    box = torch.zeros(8, 6, 5, pin_memory=True)
    src3 = torch.randn(8, 2, 5, device="cuda")
    assert copy_rows_from_device(box[:, 3:5], src3)  # a box of dimension 1: each row still one run
    torch.cuda.synchronize()
    assert torch.equal(box[:, 3:5], src3.cpu())
    assert not copy_rows_from_device(box[:, :2, 1:3], torch.randn(8, 2, 2, device="cuda"))  # rows not runs: refused


def _staged_cuda_columns(rank: int, world: int, root: str) -> list:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    from hf_storage import row_assembly

    torch.cuda.set_device(0)  # two ranks on one GPU: gloo carries the few messages, the tensors stay on CUDA
    mesh = DeviceMesh("cuda", list(range(world)))
    full = torch.randn(32, 4096, generator=torch.Generator().manual_seed(1)).bfloat16()
    local = full.chunk(world, dim=1)[rank].cuda()
    sd = {"cols": DTensor.from_local(local, mesh, [Shard(1)], run_check=False)}
    out = []
    for step in range(2):
        local.add_(1)
        summary = hf_storage.async_save(sd, f"{root}/s{step}").result()
        out.append(summary.assembled_bytes)
    out.append(all(s.pinned for s in row_assembly._STAGED.values()))
    return out


def test_async_save_stages_cuda_column_shards_into_the_rows_with_strided_copies(tmp_path):
    from .dist_utils import run_ranks

    results = run_ranks(_staged_cuda_columns, 2, str(tmp_path), timeout=240)
    want = torch.randn(32, 4096, generator=torch.Generator().manual_seed(1)).bfloat16()
    for step in range(2):
        want.add_(1)  # as each rank's shard changed before save ``step``
        assert torch.equal(loaded(tmp_path / f"s{step}")["cols"], want)
    assert all(r[:2] == [32 * 4096 * 2 // 2] * 2 and r[2] for r in results), results
