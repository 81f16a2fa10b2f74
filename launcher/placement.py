"""Where each rank runs: which GPU (matched between NVML and CUDA by UUID), which CPUs, enough memory.

    torchrun --nproc-per-node=8 -m launcher.save +model=llama3_8b placement=cuda output.dir=/ckpt/step-1000

NVML numbers GPUs in PCI bus order, CUDA (by default) fastest first, and ``CUDA_VISIBLE_DEVICES`` hides
some GPUs from CUDA only; so GPUs are matched by UUID, and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is set (unless
the user set it) so CUDA ordinals follow NVML's order too. A machine without an NVIDIA driver raises
``NVMLError`` on init: that is zero GPUs, and ``placement.device=auto`` then runs on CPU with gloo.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .config import Device

log = logging.getLogger(__name__)

CUDA_BACKEND = "cuda:nccl,cpu:gloo"  # NCCL for tensors on GPU, gloo for the CPU-side object collectives
CPU_BACKEND = "gloo"


class PlacementError(RuntimeError):
    """The requested devices do not exist or cannot hold this rank's shard; the message says what to change."""


@dataclass(frozen=True)
class Gpu:
    index: int  # NVML index (PCI bus order)
    uuid: str  # "GPU-xxxxxxxx-..."
    pci_bus_id: str
    free_bytes: int
    total_bytes: int
    cpus: tuple[int, ...]  # CPUs NVML reports close to this GPU; () if unknown


@dataclass(frozen=True)
class Placement:
    device: torch.device
    backend: str
    gpu: Gpu | None = None
    threads: int = 1  # CPU worker threads this rank may use (CPU placement)

    @property
    def device_type(self) -> str:
        return self.device.type


def cpus_from_mask(words) -> tuple[int, ...]:
    """CPU numbers from NVML's affinity bitmask (64-bit words, CPU 0 = bit 0 of word 0)."""
    return tuple(64 * w + b for w, word in enumerate(words) for b in range(64) if (int(word) >> b) & 1)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _gpu(nvml, i: int) -> Gpu:
    h = nvml.nvmlDeviceGetHandleByIndex(i)
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    try:
        cpus = cpus_from_mask(nvml.nvmlDeviceGetCpuAffinity(h, ((os.cpu_count() or 1) + 63) // 64))
    except nvml.NVMLError:
        cpus = ()
    return Gpu(
        i,
        _text(nvml.nvmlDeviceGetUUID(h)),
        _text(nvml.nvmlDeviceGetPciInfo(h).busId),
        int(mem.free),
        int(mem.total),
        cpus,
    )


def nvml_gpus() -> list[Gpu]:
    """Every GPU NVML sees, in PCI bus order; [] when there is no driver, no library or any NVML error."""
    try:
        import pynvml as nvml
    except ImportError:
        return []
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError) as e:
        log.debug("NVML unavailable (%s): no GPUs", e)
        return []
    try:
        return [_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
    except nvml.NVMLError as e:
        log.warning("NVML failed while listing GPUs (%s): treating this node as having none", e)
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def cuda_uuids() -> list[str]:
    """The UUIDs of the GPUs this process's CUDA sees, by CUDA ordinal ("GPU-..." like NVML)."""
    if not torch.cuda.is_available():
        return []
    uuids = [str(torch.cuda.get_device_properties(j).uuid) for j in range(torch.cuda.device_count())]
    return [u if u.startswith(("GPU-", "MIG-")) else f"GPU-{u}" for u in uuids]


def select_gpus(gpus: list[Gpu], visible: list[str], wanted) -> list[Gpu]:
    """The GPUs local ranks 0, 1, ... get: ``wanted`` (NVML indices or UUIDs) or every CUDA-visible one."""
    usable = [g for g in gpus if g.uuid in visible]
    if wanted is None:
        return usable
    by_key = {str(g.index): g for g in usable} | {g.uuid: g for g in usable}
    unknown = [str(w) for w in wanted if str(w) not in by_key]
    if unknown:
        known = ", ".join(f"{g.index} ({g.uuid})" for g in usable) or "none"
        raise PlacementError(
            f"placement.gpus lists {unknown}, which are not GPUs CUDA can use here; "
            f"usable GPUs (NVML index, UUID): {known}"
        )
    return [by_key[str(w)] for w in wanted]


def check_free(free: int, need: int, where: str) -> None:
    if need > free:
        raise PlacementError(
            f"{where} has {free / 2**30:.2f} GiB free but this rank needs about {need / 2**30:.2f} GiB for its "
            "shard; spread the model over more ranks (world.nproc_per_node, world.nnodes), free the memory, "
            "or skip the check with placement.check_free_memory=false"
        )


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_threads(local_world_size: int) -> int:
    """``OMP_NUM_THREADS`` if set (torchrun sets 1), else this node's CPUs split between its ranks."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, local_world_size))


def _cpu_placement(pcfg, need: int, local_world_size: int) -> Placement:
    avail = mem_available()
    if pcfg.check_free_memory and avail is not None:
        check_free(
            avail // max(1, local_world_size),
            int(need * pcfg.headroom),
            f"this node's memory (shared by {local_world_size} ranks)",
        )
    return Placement(torch.device("cpu"), CPU_BACKEND, threads=cpu_threads(local_world_size))


def bind_near(gpu: Gpu) -> None:
    """Pin this process to the CPUs NVML reports near ``gpu`` that it may use (cgroups may allow fewer)."""
    if not gpu.cpus or not hasattr(os, "sched_setaffinity"):
        return
    cpus = set(gpu.cpus) & os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    else:
        log.warning("NVML puts GPU %d near CPUs this process may not use; CPU affinity left as is", gpu.index)


def _cuda_placement(pcfg, gpus: list[Gpu], visible: list[str], local_rank: int, need: int) -> Placement:
    if local_rank >= len(gpus):
        raise PlacementError(
            f"local rank {local_rank} needs a GPU of its own but only {len(gpus)} are usable here "
            f"(placement.gpus={list(pcfg.gpus) if pcfg.gpus is not None else None}); start at most {len(gpus)} "
            "ranks per node (world.nproc_per_node / --nproc-per-node), list more GPUs, or use placement=cpu"
        )
    gpu = gpus[local_rank]
    device = torch.device("cuda", visible.index(gpu.uuid))
    torch.cuda.set_device(device)
    if pcfg.bind_cpus:
        bind_near(gpu)
    if pcfg.check_free_memory:
        check_free(gpu.free_bytes, int(need * pcfg.headroom), f"GPU {gpu.index} ({gpu.uuid}, {gpu.pci_bus_id})")
    return Placement(device, CUDA_BACKEND, gpu)


def choose(pcfg, local_rank: int, local_world_size: int, need_bytes: int) -> Placement:
    """This rank's device and process-group backend for ``placement`` config ``pcfg``."""
    kind = Device(pcfg.device) if not isinstance(pcfg.device, Device) else pcfg.device
    if kind is Device.cpu:
        return _cpu_placement(pcfg, need_bytes, local_world_size)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    gpus = nvml_gpus()
    visible = cuda_uuids() if gpus else []
    chosen = select_gpus(gpus, visible, pcfg.gpus) if visible else []
    if not chosen:
        if kind is Device.cuda:
            raise PlacementError(
                f"placement.device=cuda but no usable GPU: NVML sees {len(gpus)}, CUDA sees {len(visible)} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch CUDA build: "
                f"{torch.version.cuda}). Use placement=cpu, or fix the driver / visibility."
            )
        log.info("no usable GPU (NVML sees %d, CUDA %d): running on CPU with gloo", len(gpus), len(visible))
        return _cpu_placement(pcfg, need_bytes, local_world_size)
    return _cuda_placement(pcfg, chosen, visible, local_rank, need_bytes)
