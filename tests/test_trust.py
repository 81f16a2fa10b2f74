"""The save path's trust rules, each with the failure that broke it before: exact pieces of every placement,
concurrent saves of one target, symlinked targets, a failure on one rank before the first collective,
``use_collectives=False``, and no shared-memory names left anywhere.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_storage
from hf_storage import publish, shards
from hf_storage.box import Box
from hf_storage.verify import verify

from .dist_utils import run_ranks


def loaded(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in Path(path).glob("*.safetensors"):
        out.update(load_file(f))
    return out


# -- exact pieces ----------------------------------------------------------------------------------


def _pieces_on_a_2x2_mesh(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (2, 2))
    out = {}
    cases = {
        "s0_ss0": (_StridedShard(0, split_factor=2), Shard(0)),  # rows {0,1},{4,5},{2,3},{6,7}: one block each
        "s0_then_ss0": (Shard(0), _StridedShard(0, split_factor=2)),  # rows {0,2},{1,3},{4,6},{5,7}
        "r_s1": (Replicate(), Shard(1)),
    }
    for name, placements in cases.items():
        local = torch.empty(0)
        spec = DTensor.from_local(
            local, mesh, placements, run_check=False, shape=torch.Size((8, 6)), stride=(6, 1)
        )._spec
        got, writes = shards._pieces((8, 6), shards._mesh_key(spec.mesh), tuple(spec.placements), shards._order(spec))
        out[name] = ([(p.box.offsets, p.box.sizes, p.local.offsets) for p in got], writes)
    return out


def test_pieces_are_the_exact_rows_each_rank_holds():
    results = run_ranks(_pieces_on_a_2x2_mesh, 4)
    rows = {r: [o[0] for o, z, _ in results[r]["s0_then_ss0"][0]] for r in range(4)}
    assert rows == {0: [0, 2], 1: [1, 3], 2: [4, 6], 3: [5, 7]}
    assert all(z == (1, 6) for r in range(4) for _, z, _ in results[r]["s0_then_ss0"][0])
    blocks = {r: results[r]["s0_ss0"][0] for r in range(4)}
    assert blocks == {
        0: [((0, 0), (2, 6), (0, 0))],
        1: [((4, 0), (2, 6), (0, 0))],
        2: [((2, 0), (2, 6), (0, 0))],
        3: [((6, 0), (2, 6), (0, 0))],
    }
    assert [results[r]["r_s1"][1] for r in range(4)] == [True, True, False, False]  # replicas written once


def test_box_arithmetic():
    b = Box((2, 4), (3, 4))
    assert b.rows(1, 2) == Box((3, 4), (2, 4))
    assert b.overlap(Box((4, 0), (10, 6))) == Box((4, 4), (1, 2))
    assert b.overlap(Box((5, 0), (1, 8))) is None
    assert Box((4, 4), (1, 2)).relative_to(b) == Box((2, 0), (1, 2))
    assert b.nbytes(2) == 24 and not b.empty and Box((0,), (0,)).empty
    starts, length = b.runs((8, 8))
    assert starts.tolist() == [20, 28, 36] and length == 4
    assert Box((2, 0), (3, 8)).single_run((8, 8)) == 16 and b.single_run((8, 8)) is None


# -- concurrent saves and the lock -----------------------------------------------------------------


def test_a_second_save_of_a_locked_target_fails_naming_the_first_and_touches_nothing(tmp_path):
    target = tmp_path / "ckpt"
    hf_storage.save({"w": torch.ones(4)}, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    first = publish.prepare(target)  # a save in progress (this process)
    try:
        with pytest.raises(hf_storage.CheckpointLockedError, match=rf"pid {os.getpid()}"):
            hf_storage.save({"w": torch.zeros(4)}, target)
        assert first.directory.is_dir(), "the second save must not touch the first one's staging"
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    finally:
        publish.abort(first)
    hf_storage.save({"w": torch.zeros(4)}, target)
    assert torch.equal(loaded(target)["w"], torch.zeros(4))
    assert not publish.staging_dirs(target) and not (tmp_path / ".ckpt.lock").exists()


def _hold_lock(path: str, ready, release) -> None:
    staging = publish.prepare(path)
    ready.set()
    release.wait(30)
    publish.abort(staging)


def test_the_lock_names_another_process_and_lock_wait_waits_for_it(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "ckpt"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(hf_storage.CheckpointLockedError) as e:
            hf_storage.save({"w": torch.ones(4)}, tmp_path / "ckpt")
        assert f"pid {holder.pid}" in str(e.value) and "host" in str(e.value) and "started" in str(e.value)
        threading.Timer(0.5, release.set).start()
        t0 = time.monotonic()
        hf_storage.save({"w": torch.ones(4)}, tmp_path / "ckpt", lock_wait=30)
        assert 0.3 < time.monotonic() - t0 < 20
    finally:
        release.set()
        holder.join(30)
    assert torch.equal(loaded(tmp_path / "ckpt")["w"], torch.ones(4))


def test_staging_of_a_dead_save_is_removed_only_under_the_lock(tmp_path):
    target = tmp_path / "ckpt"
    dead = tmp_path / ".ckpt.staging-deadbeef0000"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"junk")
    hf_storage.save({"w": torch.ones(2)}, target)
    assert not dead.exists() and (target / "model.safetensors.index.json").is_file()


def _race(rank: int, world: int, target: str) -> str:
    """Two independent jobs (one process each, no common group) save the same target at once."""
    sd = {"w": torch.full((256, 256), float(rank))}
    try:
        hf_storage.save(sd, target, lock_wait=0)
    except hf_storage.CheckpointLockedError as e:
        return f"locked: {e}"
    return "saved"


def test_two_jobs_racing_into_one_target_never_mix_their_bytes(tmp_path):
    import torch.multiprocessing as mp

    target = str(tmp_path / "ckpt")
    for _ in range(3):
        ctx = mp.get_context("spawn")
        with ctx.Pool(2) as pool:
            outcomes = pool.starmap(_race, [(r, 2, target) for r in range(2)])
        assert "saved" in outcomes
        report = verify(target)
        assert report.ok, report.format()
        w = loaded(target)["w"]
        assert torch.equal(w, torch.full_like(w, w[0, 0].item())), "bytes of two saves were mixed"
        for o in outcomes:
            assert o == "saved" or ("another save" in o and "pid" in o)


# -- symlinked targets -----------------------------------------------------------------------------


def test_a_symlinked_target_replaces_the_directory_it_names_and_keeps_the_link(tmp_path):
    step = tmp_path / "step-1000"
    hf_storage.save({"w": torch.ones(3)}, step)
    (step / "tokenizer.json").write_text("{}")
    latest = tmp_path / "latest"
    latest.symlink_to("step-1000")
    for value in (2.0, 3.0):
        hf_storage.save({"w": torch.full((3,), value)}, latest)
        assert latest.is_symlink() and os.readlink(latest) == "step-1000"
        assert torch.equal(loaded(step)["w"], torch.full((3,), value))
        assert (step / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1000"]


def test_a_dangling_symlink_target_creates_the_directory_it_names(tmp_path):
    latest = tmp_path / "latest"
    latest.symlink_to("step-2000")
    hf_storage.save({"w": torch.ones(3)}, latest)
    assert latest.is_symlink() and (tmp_path / "step-2000" / "model.safetensors.index.json").is_file()


# -- a failure on one rank before the first collective ----------------------------------------------


def _asymmetric(rank: int, world: int, out: str) -> tuple[str, float]:
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    sd = {"w": torch.ones(8), "step": 3 if rank == 1 else torch.tensor(3)}  # rank 1 alone holds a non-tensor
    t0 = time.monotonic()
    try:
        hf_storage.save(sd, out, process_group=group)
    except hf_storage.HFStorageError as e:
        return f"{type(e).__name__}: {e}", time.monotonic() - t0
    return "no error", time.monotonic() - t0


def test_one_rank_failing_before_the_first_collective_fails_every_rank_at_once(tmp_path):
    out = tmp_path / "ckpt"
    results = run_ranks(_asymmetric, 2, str(out), timeout=120)
    for rank, (message, seconds) in enumerate(results):
        assert seconds < 5, f"rank {rank} waited {seconds:.1f} s"
        assert "'step'" in message and "not tensors" in message, message
    assert all(m.startswith("SaveError") and "rank 1" in m for m, _ in results)  # one named error everywhere
    assert not out.exists() and not publish.staging_dirs(out)


def _no_collectives(rank: int, world: int, out: str) -> str:
    import torch.distributed.checkpoint as dcp

    try:
        dcp.save(
            {"w": torch.ones(4)},
            storage_writer=hf_storage.HuggingFaceStorageWriter(out),
            no_dist=False,
            **({"use_collectives": False} if _has_use_collectives() else {}),
        )
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _has_use_collectives() -> bool:
    import inspect

    import torch.distributed.checkpoint as dcp

    return "use_collectives" in inspect.signature(dcp.save).parameters


@pytest.mark.skipif(not _has_use_collectives(), reason="this torch's dcp.save has no use_collectives")
def test_dcp_without_collectives_is_refused_clearly(tmp_path):
    results = run_ranks(_no_collectives, 2, str(tmp_path / "ckpt"), timeout=120)
    assert all("use_collectives=False" in r for r in results), results
    assert not (tmp_path / "ckpt").exists()


def test_index_metadata_lists_checksums_for_every_tensor(tmp_path):
    hf_storage.save({"a": torch.ones(3), "b": torch.zeros(2, 2)}, tmp_path / "c")
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    assert set(index["metadata"]["checksums"]["tensors"]) == {"a", "b"}


def test_sweep_removes_dead_staging_and_keeps_a_live_saves(tmp_path):
    dead = tmp_path / ".step-5.staging-0123456789ab"
    dead.mkdir()
    live = publish.prepare(tmp_path / "step-6")
    try:
        assert publish.sweep(tmp_path) == [dead]
        assert not dead.exists() and live.directory.is_dir()
    finally:
        publish.abort(live)
