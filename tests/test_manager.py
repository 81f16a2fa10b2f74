"""``hf_storage.manager.CheckpointManager``: when it saves, what it keeps, the ``latest`` link, deletions that a crash
cannot tear, resuming from the newest complete checkpoint; in one process (sync and async), on two gloo ranks,
and a torchrun job killed in the middle of an async save and resumed bit for bit."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from hf_storage import HFStorageError, SaveSummary
from hf_storage import manager as manager_module
from hf_storage.layout import INDEX_NAME
from hf_storage.manager import LATEST, CheckpointManager, step_dir

from .dist_utils import run_ranks
from .test_examples import ROOT, SCRIPT, assert_bitwise_equal, digest, losses, tensors, torchrun

ASYNC = [False, True]


def state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16)}


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def save_steps(m: CheckpointManager, steps) -> list:
    return [m.maybe_save(s, state(s)) for s in steps]


@pytest.mark.parametrize("async_mode", ASYNC)
def test_saves_every_k_steps_keeps_the_newest_and_links_latest(tmp_path, async_mode):
    m = CheckpointManager(tmp_path, every=3, keep=2, async_mode=async_mode)
    results = save_steps(m, range(1, 11))
    m.wait()
    saved = [s for s, r in zip(range(1, 11), results) if r is not None]
    assert saved == [3, 6, 9]
    kind = Future if async_mode else SaveSummary
    assert all(isinstance(r, kind) for r in results if r is not None)
    assert entries(tmp_path) == [LATEST, step_dir(6), step_dir(9)]  # no lock, staging or deleting leftovers
    assert os.readlink(tmp_path / LATEST) == step_dir(9)  # relative: the run directory can move
    assert m.latest() == (9, tmp_path / step_dir(9))


@pytest.mark.parametrize("async_mode", ASYNC)
def test_load_latest_fills_the_newest_complete_checkpoint(tmp_path, async_mode):
    m = CheckpointManager(tmp_path, every=1, async_mode=async_mode, extra_files={"a.json": "{}"})
    save_steps(m, [1, 2])
    m.maybe_save(3, state(3), extra_files={"b.json": "[]"})
    target = {k: torch.zeros_like(t) for k, t in state(0).items()}
    assert m.load_latest(target) == 3  # settles the save in flight first
    assert all(torch.equal(target[k], t) for k, t in state(3).items())
    assert {"a.json", "b.json"} <= set(entries(tmp_path / step_dir(3)))  # per-call extra files add to the fixed ones


def test_load_latest_of_an_empty_root_builds_and_loads_nothing(tmp_path):
    built = []
    m = CheckpointManager(tmp_path / "none-yet", every=5)
    assert m.load_latest(lambda: built.append(1) or {}) is None
    assert built == [] and m.latest() is None


def test_latest_skips_staging_locks_deleting_and_incomplete_directories(tmp_path):
    m = CheckpointManager(tmp_path, every=1)
    save_steps(m, [1, 2])
    for name in (".step-00000007.staging-abc", ".step-00000008.deleting-abc", "step-00000009", "step-notanumber"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model-00001-of-00001.safetensors").write_bytes(b"torn")
    (tmp_path / ".step-00000010.lock").write_text("{}")
    (tmp_path / "step-00000011").write_text("a file, not a directory")
    (tmp_path / LATEST).unlink()
    os.symlink(step_dir(1), tmp_path / LATEST)  # a stale link does not decide either
    assert m.latest() == (2, tmp_path / step_dir(2))
    target = {k: torch.zeros_like(t) for k, t in state(0).items()}
    assert m.load_latest(target) == 2


def test_deleting_renames_first_so_a_crash_never_leaves_a_torn_checkpoint(tmp_path, monkeypatch):
    removed = []
    monkeypatch.setattr(manager_module, "_remove", removed.append)  # the process "dies" before rmtree
    m = CheckpointManager(tmp_path, every=1, keep=1)
    save_steps(m, [1, 2])
    m.wait()
    hidden = [n for n in entries(tmp_path) if n.startswith(f".{step_dir(1)}.deleting-")]
    assert len(hidden) == 1 and removed == [tmp_path / hidden[0]]
    assert (tmp_path / hidden[0] / INDEX_NAME).is_file()  # whole, but hidden: never taken for a checkpoint
    assert m.latest() == (2, tmp_path / step_dir(2))
    monkeypatch.undo()
    os.symlink(step_dir(2), tmp_path / ".latest.tmp-dead")  # a link update that died before its os.replace
    CheckpointManager(tmp_path, every=1).wait()  # a new run sweeps what the crashed one left
    assert entries(tmp_path) == [LATEST, step_dir(2)]


def test_never_deletes_the_step_just_saved_even_if_an_older_run_left_newer_ones(tmp_path):
    m = CheckpointManager(tmp_path, every=1, keep=1)
    save_steps(m, [20])
    save_steps(m, [5])
    m.wait()
    assert entries(tmp_path) == [LATEST, step_dir(5), step_dir(20)]
    assert os.readlink(tmp_path / LATEST) == step_dir(20)  # latest = the newest complete, as latest() says


def test_an_async_error_is_raised_once_at_the_next_save_and_the_run_goes_on(tmp_path):
    (tmp_path / step_dir(2)).write_text("a file where the checkpoint should go")
    m = CheckpointManager(tmp_path, every=1, async_mode=True)
    save_steps(m, [1, 2])
    deadline = time.monotonic() + 30
    while m.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert m.poll() is None  # poll leaves an error for the next save or wait, on every rank at once
    with pytest.raises(HFStorageError, match="is not a directory"):
        m.maybe_save(3, state(3))
    assert m.wait() is None  # raised once
    assert isinstance(m.maybe_save(3, state(3)), Future)
    assert isinstance(m.wait(), SaveSummary) and m.latest() == (3, tmp_path / step_dir(3))


def test_poll_does_the_housekeeping_of_a_finished_save_without_waiting(tmp_path):
    m = CheckpointManager(tmp_path, every=2, keep=1, async_mode=True)
    future = m.maybe_save(2, state(2))
    future.result()
    assert m.maybe_save(3, state(3)) is None  # a step that saves nothing polls
    assert os.readlink(tmp_path / LATEST) == step_dir(2) and not m.in_flight
    assert m.poll() is None and m.wait() is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, "every must be >= 1"),
        ({"every": 1, "keep": 0}, ValueError, "keep must be >= 1"),
        ({"every": 1, "shard_size": "5GB"}, TypeError, "unknown save option.*max_shard_size"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        CheckpointManager(tmp_path, **kwargs)


# -- two ranks --------------------------------------------------------------------------------------------


def _save_six_steps(rank: int, world: int, root: str, async_mode: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    m = CheckpointManager(root, every=2, keep=1, async_mode=async_mode)
    touched: list = []
    if rank != 0:  # only rank 0 links and deletes
        m._link = m._delete = touched.append  # type: ignore[method-assign]
    for step in range(1, 7):
        m.maybe_save(step, {k: distribute_tensor(t, mesh, [Shard(0)]) for k, t in state(step).items()})
    m.wait()
    target = {k: distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]) for k, t in state(0).items()}
    step = m.load_latest(target)
    same = all(torch.equal(target[k].full_tensor(), t) for k, t in state(6).items())
    return {"step": step, "same": same, "touched": touched, "rank0": m.rank0}


def _two_ranks(rank: int, world: int, root: str) -> list[dict]:
    return [_save_six_steps(rank, world, f"{root}/async-{a}", a) for a in ASYNC]


@pytest.mark.slow
def test_two_ranks_save_together_and_only_rank_0_keeps_house(tmp_path):
    results = run_ranks(_two_ranks, 2, str(tmp_path), timeout=120)
    for async_mode, rank0, rank1 in zip(ASYNC, *results):
        assert [rank0["rank0"], rank1["rank0"]] == [True, False]
        assert all(r["step"] == 6 and r["same"] and r["touched"] == [] for r in (rank0, rank1)), async_mode
        assert entries(tmp_path / f"async-{async_mode}") == [LATEST, step_dir(6)]


# -- a torchrun job killed in the middle of a save --------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (torchrun starts its workers in new sessions: a process group kill misses them)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _pump(stream, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def run_and_kill(args: list[str], env: dict[str, str], line: str, timeout: float) -> str:
    """Run the example under torchrun; SIGKILL the agent and every worker as soon as ``line`` is printed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    try:
        while not seen or seen[-1].strip() != line:
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
    except queue.Empty:
        pytest.fail(f"{line!r} never appeared within {timeout} s:\n{''.join(seen)}")
    finally:
        pids = [proc.pid, *_children(proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
        _wait_gone(pids[1:], 30)  # the workers too: their locks go with them
    return "".join(seen)


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(")")[-1].split()[0] in ("Z", "X"):
                        break
            except FileNotFoundError:
                break
            time.sleep(0.05)


@pytest.mark.slow
def test_a_job_killed_mid_save_resumes_from_the_newest_complete_checkpoint_bit_for_bit(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--steps", "15", "--save-every", "5", "--keep", "2"]
    out_a = torchrun(*common, "--out", str(a))  # uninterrupted, synchronous
    assert entries(a) == [LATEST, step_dir(10), step_dir(15)]

    hang = {"TRAIN_FSDP_CPU_HANG_IN_SAVE": "10"}  # the save of step 10 stops once it has written bytes
    killed = run_and_kill(
        [*common, "--out", str(b), "--async"],
        hang,
        "writing step 10: hanging (TRAIN_FSDP_CPU_HANG_IN_SAVE)",
        timeout=40,
    )
    assert re.search(r"^saved step-00000005: stall [\d.]+ s, background [\d.]+ s, ", killed, re.M)
    assert not (b / step_dir(10) / INDEX_NAME).exists()  # the killed save is not complete...
    assert [p.name for p in b.glob(f".{step_dir(10)}.staging-*")]  # ...though it had begun writing
    m = CheckpointManager(b, every=5)
    assert m.latest() == (5, b / step_dir(5)) and os.readlink(b / LATEST) == step_dir(5)
    deadline = time.monotonic() + 20  # the killed save's lock goes when the kernel has reaped its holder
    while list(b.glob(f".{step_dir(10)}.staging-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
        CheckpointManager(b, every=5).wait()  # a new manager sweeps a dead save's staging
    assert not list(b.glob(f".{step_dir(10)}.staging-*")), "a dead save's staging outlived its lock"
    saved_5 = digest({k: t for k, t in tensors(b / step_dir(5)).items() if not k.startswith("optimizer.")})

    out_b = torchrun(*common, "--out", str(b), "--async", "--resume", "--digest")
    resumed = re.search(r"^resumed from step (\d+) .* params_sha256=(\w+)$", out_b, re.M)
    assert resumed and resumed[1] == "5" and resumed[2] == saved_5  # ...and not chosen
    assert losses(out_b) == {s: v for s, v in losses(out_a).items() if s > 5}
    assert entries(b) == [LATEST, step_dir(10), step_dir(15)]  # the dead save's staging is gone too
    for step in (10, 15):
        assert_bitwise_equal(tensors(b / step_dir(step)), tensors(a / step_dir(step)))
