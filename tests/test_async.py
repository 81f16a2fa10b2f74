"""``hf_storage.async_save``: saves in a row while training changes the state, errors of the background part on
every rank (and again at the next save if nobody asked), one save at a time, reused host copies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_storage
from hf_storage.verify import verify

from .dist_utils import run_ranks

SHAPES = {"embed": (24, 16), "proj": (16, 40), "norm": (16,)}


def full_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {
        k: torch.randn(shape, generator=g).to(torch.bfloat16 if k == "proj" else torch.float32)
        for k, shape in SHAPES.items()
    }


def loaded(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in Path(path).glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _five_saves(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    places = {"embed": Shard(0), "proj": Shard(1), "norm": Replicate()}  # rows, columns, replicas
    sd = {k: distribute_tensor(t, mesh, [places[k]]) for k, t in full_state(0).items()}
    stalls, pending = [], []
    for step in range(1, 6):
        for k, t in full_state(step).items():  # "training": the state changes in place between saves
            sd[k].to_local().copy_(distribute_tensor(t, mesh, [places[k]]).to_local())
        pending.append(hf_storage.async_save(sd, f"{root}/step-{step}", max_shard_size=600))
        x = torch.ones(4)
        dist.all_reduce(x)  # the training group stays free for the caller meanwhile
        assert x.tolist() == [world] * 4
    summaries = [f.result() for f in pending[-1:]]  # earlier ones were settled by the next call
    stalls = [s.stall_seconds for s in summaries]
    return {"stalls": stalls, "held": len(hf_storage.background._SAVER.copies.buffers)}


@pytest.mark.parametrize("overlap", ["1", "0"])
def test_five_async_saves_in_a_row_each_equal_to_the_state_at_its_step(tmp_path, monkeypatch, overlap):
    """With the writes overlapping the copy (each chunk written once it is copied) and without."""
    monkeypatch.setenv("HF_STORAGE_ASYNC_OVERLAP", overlap)
    results = run_ranks(_five_saves, 2, str(tmp_path), timeout=240)
    for step in range(1, 6):
        got, want = loaded(tmp_path / f"step-{step}"), full_state(step)
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), f"step {step} differs"
        report = verify(tmp_path / f"step-{step}")
        assert report.ok, report.format()
    assert all(r["held"] > 0 for r in results)


def _background_error(rank: int, world: int, root: str) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    sd = {"w": distribute_tensor(torch.arange(32.0).reshape(8, 4), mesh, [Shard(0)])}
    blocker = Path(root) / "file"
    if rank == 0:
        blocker.write_text("not a directory")
    out = []
    fut = hf_storage.async_save(sd, blocker / "ckpt")  # rank 0 cannot create it: fails in the background
    try:
        fut.result()
        out.append("no error")
    except hf_storage.HFStorageError as e:
        out.append(f"result: {type(e).__name__}: {e}")
    hf_storage.async_save(sd, blocker / "ckpt2")  # nobody asks for this one's error...
    try:
        hf_storage.async_save(sd, Path(root) / "ok").result()  # ...so the next call raises it
        out.append("no error")
    except hf_storage.HFStorageError as e:
        out.append(f"next: {type(e).__name__}: {e}")
    hf_storage.async_save(sd, Path(root) / "ok").result()
    out.append("recovered")
    return out


def test_background_errors_surface_on_every_rank_and_at_the_next_save_if_nobody_asked(tmp_path):
    results = run_ranks(_background_error, 2, str(tmp_path), timeout=240)
    for first, second, third in results:
        assert first.startswith("result:") and "rank 0" in first, first
        assert second.startswith("next:") and "rank 0" in second, second
        assert third == "recovered"
    assert (tmp_path / "ok" / "model.safetensors.index.json").is_file()


def test_if_busy_raise_refuses_a_second_save_while_the_first_writes(tmp_path, monkeypatch):
    import threading

    from hf_storage import pipeline

    gate = threading.Event()
    real = pipeline.write_shared

    def slow(*a, **k):
        gate.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "write_shared", slow)
    first = hf_storage.async_save({"w": torch.ones(4)}, tmp_path / "a")
    with pytest.raises(hf_storage.SaveInProgressError, match="still writing"):
        hf_storage.async_save({"w": torch.ones(4)}, tmp_path / "b", if_busy="raise")
    gate.set()
    assert first.result().tensors == 1
    second = hf_storage.async_save({"w": torch.zeros(4)}, tmp_path / "b", if_busy="raise")
    assert second.result().stall_seconds >= 0 and torch.equal(loaded(tmp_path / "b")["w"], torch.zeros(4))


def test_host_copies_are_reused_for_the_same_state(tmp_path):
    sd = {"w": torch.randn(64, 64)}
    hf_storage.async_save(sd, tmp_path / "a").result()
    first = [b.data_ptr() for b in hf_storage.background._SAVER.copies.buffers]
    sd["w"].add_(1)
    hf_storage.async_save(sd, tmp_path / "b").result()
    assert [b.data_ptr() for b in hf_storage.background._SAVER.copies.buffers] == first
    assert torch.equal(loaded(tmp_path / "b")["w"], sd["w"])
    assert os.path.isdir(tmp_path / "a")


def _process_mode_and_dcp(rank: int, world: int, root: str) -> str:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    places = {"embed": Shard(0), "proj": Shard(1), "norm": Replicate()}
    sd = {k: distribute_tensor(t, mesh, [places[k]]) for k, t in full_state(0).items()}
    for step in range(1, 4):  # ours, in a writer process per rank
        for k, t in full_state(step).items():
            sd[k].to_local().copy_(distribute_tensor(t, mesh, [places[k]]).to_local())
        hf_storage.async_save(sd, f"{root}/process-{step}", mode="process").result()
    group = dist.new_group(backend="gloo")
    kinds = {"thread": AsyncCheckpointerType.THREAD, "process": AsyncCheckpointerType.PROCESS}
    for name, kind in kinds.items():  # DCP's own async_save, with our writer (and its default stager)
        writer = hf_storage.HuggingFaceStorageWriter(f"{root}/dcp-{name}")
        fut = dcp.async_save(sd, storage_writer=writer, process_group=group, async_checkpointer_type=kind)
        (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return "no stager"
    stager = DefaultStager(StagingOptions(False, False, False, False))
    fut = dcp.async_save(
        sd,
        storage_writer=hf_storage.HuggingFaceStorageWriter(f"{root}/dcp-stager"),
        process_group=group,
        async_stager=stager,
    )
    (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
    stager.close()
    return "ok"


def test_process_mode_and_dcp_async_save_with_our_writer(tmp_path):
    results = run_ranks(_process_mode_and_dcp, 2, str(tmp_path), timeout=300)
    assert all(r in ("ok", "no stager") for r in results), results
    for step in range(1, 4):
        got, want = loaded(tmp_path / f"process-{step}"), full_state(step)
        assert all(torch.equal(got[k], want[k]) for k in want), f"process-mode step {step} differs"
    names = ["dcp-thread", "dcp-process"] + (["dcp-stager"] if results[0] == "ok" else [])
    for name in names:
        got, want = loaded(tmp_path / name), full_state(3)
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert verify(tmp_path / name).ok
