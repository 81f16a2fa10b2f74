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


def _staged_columns(rank: int, world: int, root: str, mesh_shape: tuple[int, ...], mode: str) -> dict:
    """Saves of column shards (and a 2-D mesh's boxes): who copies into the node's rows, and which rows."""
    import threading

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from hf_storage import row_assembly

    copiers = []
    real = row_assembly._copy_in

    def counted(*a):
        copiers.append(threading.current_thread() is threading.main_thread())
        return real(*a)

    row_assembly._copy_in = counted
    mesh = init_device_mesh("cpu", mesh_shape)
    places = [Shard(1)] if len(mesh_shape) == 1 else [Shard(0), Shard(1)]
    kinds = {"cols": places, "rows": [Shard(0)] + [Replicate()] * (len(mesh_shape) - 1)}
    shapes = {"cols": (48, 4096), "rows": (64, 32)}  # cols: runs of 2-4 KiB, row assembly takes them
    rows_seen, assembled = [], []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        full = {k: torch.randn(shapes[k], generator=g).bfloat16() for k in shapes}
        sd = {k: distribute_tensor(full[k], mesh, kinds[k]) for k in full}
        assembled.append(hf_storage.async_save(sd, f"{root}/s{step}", mode=mode).result().assembled_bytes)
        rows_seen.append({pid: s.ino for pid, s in row_assembly._STAGED.items()})
    host_copies = sum(b.numel() * b.element_size() for b in hf_storage.background._SAVER.copies.buffers)
    return {"copiers": copiers, "rows": rows_seen, "assembled": assembled, "host_copies": host_copies}


@pytest.mark.parametrize(
    "mesh_shape,mode",
    [((2,), "thread"), ((2, 2), "thread"), ((2,), "process")],
    ids=["columns-2-thread", "mesh-2x2-thread", "columns-2-process"],
)
def test_column_shards_are_staged_straight_into_the_nodes_rows(tmp_path, mesh_shape, mode):
    """The foreground copies each column shard into its place in whole rows that the node shares; the background
    (thread, or writer process) copies nothing and only writes; there is no other host copy of the column shards;
    the rows are made once and reused; every checkpoint is bitwise right."""
    world = len(mesh_shape) * 2
    results = run_ranks(_staged_columns, world, str(tmp_path), mesh_shape, mode, timeout=240)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        want = {"cols": torch.randn(48, 4096, generator=g).bfloat16(), "rows": torch.randn(64, 32, generator=g)}
        got = loaded(tmp_path / f"s{step}")
        assert torch.equal(got["cols"], want["cols"]) and torch.equal(got["rows"], want["rows"].bfloat16())
        assert verify(tmp_path / f"s{step}").ok
    local_cols = 48 * 4096 * 2 // world
    for r in results:
        assert r["copiers"] and all(r["copiers"]), "a copy into the rows ran on the background thread"
        assert r["assembled"] == [local_cols] * 3
        assert r["rows"][0] and r["rows"][0] == r["rows"][1] == r["rows"][2], "the staged rows were made anew"
        assert r["host_copies"] < local_cols, "the column shards also got host copies of their own"


def _staging_fails_on_rank1(rank: int, world: int, root: str, mode: str) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hf_storage import row_assembly

    real = row_assembly._copy_in

    def broken(*a):
        raise OSError("staging broke")

    mesh = init_device_mesh("cpu", (world,))
    sd = {"w": distribute_tensor(torch.randn(16, 4096, generator=torch.Generator().manual_seed(5)), mesh, [Shard(1)])}
    out = []
    row_assembly._copy_in = broken if rank == 1 else real
    try:
        fut = hf_storage.async_save(sd, f"{root}/bad", mode=mode)
        fut.result()
        out.append("no error")
    except (hf_storage.HFStorageError, OSError) as e:
        out.append(f"{type(e).__name__}: {e}")
    row_assembly._copy_in = real  # the caller has had its error: the next save is not refused with it again
    out.append(str(hf_storage.async_save(sd, f"{root}/good", mode=mode).result().assembled_bytes))
    return out


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_failed_staging_copy_fails_the_save_on_every_rank_and_publishes_nothing(tmp_path, mode):
    r0, r1 = run_ranks(_staging_fails_on_rank1, 2, str(tmp_path), mode, timeout=240)
    assert r1[0] == "OSError: staging broke", r1
    assert r0[0].startswith(("HFStorageError", "SaveError")) and "rank 1" in r0[0], r0  # the call or its future
    assert not (tmp_path / "bad" / "model.safetensors.index.json").exists()
    assert r0[1] == r1[1] == str(16 * 4096 * 4 // 2)
    want = torch.randn(16, 4096, generator=torch.Generator().manual_seed(5))
    assert torch.equal(loaded(tmp_path / "good")["w"], want)


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
