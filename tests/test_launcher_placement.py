"""Placement logic: NVML errors mean zero GPUs, GPUs matched by UUID, CPU masks, memory checks.

The NVML answers come from a stand-in module (this machine has no driver); CUDA itself is never faked:
what needs a real GPU is in ``test_launcher_gpu.py`` and skipped without one.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from launcher import placement
from launcher.config import PlacementConfig


class FakeNVMLError(Exception):
    pass


def fake_nvml(gpus: list[dict], fail_init: bool = False, fail_count: bool = False) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError

    def init():
        if fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    def count():
        if fail_count:
            raise FakeNVMLError("Unknown Error")
        return len(gpus)

    def affinity(h, words):
        if "mask" not in gpus[h]:
            raise FakeNVMLError("Not Supported")
        return gpus[h]["mask"]

    m.nvmlInit, m.nvmlShutdown, m.nvmlDeviceGetCount = init, lambda: None, count
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(free=gpus[h]["free"], total=80 << 30)
    m.nvmlDeviceGetUUID = lambda h: gpus[h]["uuid"].encode()  # older bindings return bytes
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=f"00000000:{h + 0x10:02X}:00.0")
    m.nvmlDeviceGetCpuAffinity = affinity
    return m


GPUS = [
    {"uuid": "GPU-aaaa", "free": 70 << 30, "mask": [0b1111]},
    {"uuid": "GPU-bbbb", "free": 1 << 30, "mask": [0, 1]},
    {"uuid": "GPU-cccc", "free": 70 << 30},
]


def cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(PlacementConfig), kw)


def test_this_machine_has_no_driver_so_auto_means_cpu_and_gloo():
    p = placement.choose(cfg(device="auto"), 0, 1, 1 << 20)
    assert (p.device.type, p.backend, p.gpu) == ("cpu", "gloo", None)


def test_cuda_without_gpus_names_the_fix():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(placement.PlacementError, match="placement=cpu"):
        placement.choose(cfg(device="cuda"), 0, 1, 1)


@pytest.mark.parametrize("kw", [{"fail_init": True}, {"fail_count": True}])
def test_nvml_errors_mean_zero_gpus(monkeypatch, kw):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(GPUS, **kw))
    assert placement.nvml_gpus() == []


def test_nvml_listing_decodes_uuid_bus_and_cpu_affinity(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(GPUS))
    gpus = placement.nvml_gpus()
    assert [g.uuid for g in gpus] == ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
    assert gpus[0].cpus == (0, 1, 2, 3) and gpus[1].cpus == (64,) and gpus[2].cpus == ()
    assert gpus[1].pci_bus_id == "00000000:11:00.0"


def test_cpu_masks_span_words():
    assert placement.cpus_from_mask([1 << 63, 0b101]) == (63, 64, 66)


def test_gpus_are_matched_by_uuid_not_by_position(monkeypatch):
    """CUDA_VISIBLE_DEVICES=2,0: CUDA ordinal 0 is NVML's GPU 2. Local ranks get NVML (PCI) order."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(GPUS))
    gpus = placement.nvml_gpus()
    visible = ["GPU-cccc", "GPU-aaaa"]
    assert [g.index for g in placement.select_gpus(gpus, visible, None)] == [0, 2]
    assert [g.index for g in placement.select_gpus(gpus, visible, ["2", "GPU-aaaa"])] == [2, 0]
    with pytest.raises(placement.PlacementError, match=r"\['1'\].*0 \(GPU-aaaa\), 2 \(GPU-cccc\)"):
        placement.select_gpus(gpus, visible, ["1"])


def test_cuda_placement_logic_ordinal_affinity_and_free_memory(monkeypatch):
    """The selection arithmetic only; set_device / sched_setaffinity are recorded, not performed."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(GPUS))
    monkeypatch.setattr(placement, "cuda_uuids", lambda: ["GPU-cccc", "GPU-bbbb", "GPU-aaaa"])
    calls = []
    monkeypatch.setattr(placement.torch.cuda, "set_device", lambda d: calls.append(("device", d.index)))
    monkeypatch.setattr(placement.os, "sched_setaffinity", lambda pid, cpus: calls.append(("cpus", sorted(cpus))))
    monkeypatch.setattr(placement.os, "sched_getaffinity", lambda pid: {1, 2, 3, 4, 5})
    p = placement.choose(cfg(device="auto"), 0, 2, 10 << 30)
    assert (p.device.type, p.device.index, p.backend, p.gpu.uuid) == ("cuda", 2, "cuda:nccl,cpu:gloo", "GPU-aaaa")
    assert calls == [("device", 2), ("cpus", [1, 2, 3])]  # NVML's CPUs that the cgroup allows
    with pytest.raises(placement.PlacementError, match=r"GPU 1 \(GPU-bbbb.*1.00 GiB free.*12.50 GiB"):
        placement.choose(cfg(device="cuda"), 1, 2, 10 << 30)
    assert placement.choose(cfg(device="cuda", check_free_memory=False), 1, 2, 10 << 30).gpu.index == 1
    with pytest.raises(placement.PlacementError, match="local rank 3 needs a GPU.*only 3 are usable"):
        placement.choose(cfg(device="cuda"), 3, 4, 1)


def test_cpu_memory_check_and_threads(monkeypatch):
    monkeypatch.setattr(placement, "mem_available", lambda: 8 << 30)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert placement.choose(cfg(device="cpu"), 0, 2, 1 << 30).threads == 3
    with pytest.raises(placement.PlacementError, match="shared by 2 ranks.*check_free_memory=false"):
        placement.choose(cfg(device="cpu"), 0, 2, 4 << 30)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert placement.cpu_threads(1) >= 1
