"""Trust on real training stacks: layouts built by the real torch APIs, saved three ways, checked bit for bit.

At 4 gloo ranks, each layout

    fsdp2              fully_shard, reshard_after_forward=True, after one optimizer step
    fsdp2_no_reshard   fully_shard, reshard_after_forward=False, saved after a further forward
    tp                 parallelize_module: ColwiseParallel, RowwiseParallel, SequenceParallel
    fsdp_tp            TP on mesh["tp"], then fully_shard on mesh["dp"] (torchtitan; _StridedShard)
    fsdp_tp_unplanned  the same with one module left out of the TP plan (its parameters on the dp submesh)
    hsdp               fully_shard on a ("dp_replicate", "dp_shard") mesh
    dsd                get_model_state_dict / set_model_state_dict on the fsdp_tp model
    strided_*          hand-made DTensors with _StridedShard in either mesh position, uneven sizes

is saved by ``hf_storage.save`` (verb), ``dcp.save`` (dcp) and ``dcp.async_save`` (async, thread mode, its own
gloo group) with the library's writer. The files, read with plain ``safetensors``, must equal the
``full_tensor()`` of every entry bit for bit; each checkpoint is then loaded into the same layout, into plain
full tensors (for dsd: rank 0's full CPU state dict, broadcast by ``set_model_state_dict``) and into another
layout, by ``hf_storage.load`` and by ``dcp.load`` with the library's reader. Test ids are
``<layout>-<save path>-<step>``. A hand-made _StridedShard layout that DCP's own planner cannot describe may
instead be refused on every rank by the DCP paths (with nothing published); the verbs must get it right.

At 2 ranks, "async save under load": a training-like loop of ``all_reduce`` on the default group runs while
``dcp.async_save`` saves column shards on a separate group; no error, every reduction right, the checkpoint
right.

All cases run in two spawns (one per world size); a hang fails within about two minutes (60 s group timeouts,
a per-rank watchdog). ``STACKS_TRACE=1`` adds tracebacks to the failure messages.
"""

from __future__ import annotations

import pytest

from tests import stacks_worker as sw
from tests.dist_utils import run_ranks


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stacks4"))
    return sw.collect(run_ranks, sw.world4_worker, 4, root, timeout=sw.WORLD4_DEADLINE + 30)


@pytest.fixture(scope="module")
def world2_async(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stacks_async"))
    return sw.collect(run_ranks, sw.async_under_load_worker, 2, root, timeout=sw.ASYNC_DEADLINE + 30)


def _verdict(collected, case: str) -> None:
    records, spawn_error, _ = collected
    rec = records.get(case)
    assert rec is not None, f"{case} never reported (a rank crashed or hung before it):\n{spawn_error}"
    assert rec["ok"], rec["msg"]


@pytest.mark.parametrize("case", sw.world4_ids())
def test_training_stack(world4, case):
    _verdict(world4, case)


@pytest.mark.parametrize("case", sw.async_ids())
def test_async_save_under_load(world2_async, case):
    _verdict(world2_async, case)


def test_every_case_reported(world4):
    """Nothing ran that the ids do not name (a renamed step would otherwise go unchecked)."""
    records, _, _ = world4
    assert set(records) <= set(sw.world4_ids()) | {"start", "end"}, sorted(set(records) - set(sw.world4_ids()))
