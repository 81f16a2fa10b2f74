"""Both save paths write the same bytes, and the scale simulation plans what the library plans.

* Real gloo processes: the gather-free ``hf_storage.save`` and DCP with ``hf_storage.HuggingFaceStorageWriter``
  write byte-identical directories for the same sharded state (row, column and 2-D meshes, uneven and
  empty chunks, replicated tensors, two dtypes), and plain ``safetensors`` reads the expected values back.
* The simulation of :mod:`bench.scale` at N = 8 and 64: its chunk boxes are DTensor's, its DCP-path
  layout equals ``hf_storage.layout.plan``, and the rank it calls worst really has the most runs.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os

import pytest
import torch

from tests.dist_utils import run_ranks

# name -> (global shape, dtype, placements per mesh dim: ("S", dim) or ("R",))
_CASES_1D = {
    "row": {
        "w.big": ((64, 48), torch.bfloat16, [("S", 0)]),
        "w.uneven": ((5, 7), torch.float32, [("S", 0)]),  # chunks of 3 and 2 rows
        "w.tiny": ((1, 3), torch.float32, [("S", 0)]),  # rank 1's chunk is empty
        "norm": ((48,), torch.bfloat16, [("R",)]),
        "scalar": ((), torch.float32, [("R",)]),
    },
    "col": {
        "w.big": ((64, 48), torch.bfloat16, [("S", 1)]),
        "w.uneven": ((5, 7), torch.float32, [("S", 1)]),  # 4 and 3 columns: one run per row
        "w.3d": ((3, 4, 6), torch.bfloat16, [("S", 1)]),
        "norm": ((48,), torch.bfloat16, [("R",)]),
    },
}
_CASES_2D = {
    "2d": {
        "w.big": ((64, 48), torch.bfloat16, [("S", 0), ("S", 1)]),
        "w.uneven": ((7, 5), torch.float32, [("S", 0), ("S", 1)]),
        "w.nested": ((10, 6), torch.bfloat16, [("S", 0), ("S", 0)]),  # FSDP x TP both on rows
        "norm": ((48,), torch.bfloat16, [("S", 0), ("R",)]),
    },
}


def _full(name: str, shape, dtype) -> torch.Tensor:
    """The deterministic global value of a tensor (every rank can rebuild it)."""
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _state(case: dict, mesh):
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    out = {}
    for name, (shape, dtype, places) in case.items():
        pl = [Shard(p[1]) if p[0] == "S" else Replicate() for p in places]
        sizes, offsets = compute_local_shape_and_global_offset(shape, mesh, pl)
        local = _full(name, shape, dtype)
        for d, (o, n) in enumerate(zip(offsets, sizes, strict=True)):
            local = local.narrow(d, o, n)
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        out[name] = DTensor.from_local(
            local.contiguous(), mesh, pl, run_check=False, shape=torch.Size(shape), stride=stride
        )
    return out


def _digest(path: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest() for n in sorted(os.listdir(path))}


def _save_both(rank: int, world: int, root: str, cases: dict, mesh_shape: tuple[int, ...]):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import hf_storage

    mesh = init_device_mesh("cpu", mesh_shape)
    out = {}
    for label, case in cases.items():
        for policy in (None, 600):  # one file, and a size limit that splits the state over several files
            state = _state(case, mesh)
            a, b = os.path.join(root, f"{label}-{policy}-verb"), os.path.join(root, f"{label}-{policy}-dcp")
            hf_storage.save(state, a, max_shard_size=policy, thread_count=2)
            dcp.save(
                state, storage_writer=hf_storage.HuggingFaceStorageWriter(b, max_shard_size=policy, thread_count=2)
            )
            out[(label, policy)] = (_digest(a), _digest(b)) if rank == 0 else None
    return out


def _check_outputs(root: str, results: dict, cases: dict) -> None:
    from safetensors.torch import load_file

    for (label, policy), (verb, via_dcp) in results.items():
        assert verb == via_dcp, f"{label} (max_shard_size={policy}): the two save paths wrote different bytes"
        files = [n for n in verb if n.endswith(".safetensors")]
        assert files and "model.safetensors.index.json" in verb
        if policy is not None:
            assert len(files) > 1, "the size limit should split this state over several files"
        loaded = {}
        for n in files:
            loaded.update(load_file(os.path.join(root, f"{label}-{policy}-verb", n)))
        case = cases[label]
        assert set(loaded) == set(case)
        for name, (shape, dtype, _) in case.items():
            assert torch.equal(
                loaded[name].reshape(-1).view(torch.uint8), _full(name, shape, dtype).reshape(-1).view(torch.uint8)
            ), name


def test_both_paths_write_identical_bytes_1d(tmp_path):
    results = run_ranks(_save_both, 2, str(tmp_path), _CASES_1D, (2,))[0]
    _check_outputs(str(tmp_path), results, _CASES_1D)


def test_both_paths_write_identical_bytes_2d(tmp_path):
    results = run_ranks(_save_both, 4, str(tmp_path), _CASES_2D, (2, 2))[0]
    _check_outputs(str(tmp_path), results, _CASES_2D)


# -- the simulation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_rows():
    from bench import scale

    return {n: scale.run_case("llama-8b", n, keep_layout=True) for n in (8, 64)}


def test_simulated_boxes_are_dtensor_boxes():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    from bench import scale

    shapes = [(7,), (5, 3), (128256, 4096), (1024, 4096), (3, 9), (1, 5)]
    for n, shape in itertools.product((8, 16, 24, 64), shapes):
        mesh = scale.mesh_for(n, 8)
        for places in (((scale.SHARD, 0), (scale.SHARD, len(shape) - 1)), ((scale.SHARD, 0), (scale.REPLICATE, -1))):
            torch_places = [Shard(0), Shard(places[1][1]) if places[1][0] == scale.SHARD else Replicate()]
            for rank in range(n):
                coord = mesh.coord(rank)
                sizes, offsets = _compute_local_shape_and_global_offset(
                    shape, (mesh.dp, mesh.tp), list(coord), torch_places
                )
                assert scale.box(shape, mesh, coord, places) == (tuple(offsets), tuple(sizes)), (shape, n, rank)


@pytest.mark.parametrize("n", [8, 64])
def test_simulation_plans_the_library_layout(sim_rows, n):
    from bench import scale
    from bench.models import llama_params, load_config
    from hf_storage.layout import plan

    row = sim_rows[n]
    params = llama_params(load_config("llama-8b")[0])
    expected = plan(scale.specs_of(params))
    got = row["dcp_layout"]
    assert [(f.name, f.header, f.size, f.tensors) for f in got.files] == [
        (f.name, f.header, f.size, f.tensors) for f in expected.files
    ]
    assert got.tensors == expected.tensors
    assert row["dcp"]["placements_ok"]
    assert row["chunks"] == n * len(params) and row["dcp"]["items"] == row["chunks"]
    # dedup drops the TP replicas of the norms: (tp - 1) of every tp copies
    norms = sum(1 for p in params if p.tp_dim is None)
    assert row["dcp"]["items_after_dedup"] == row["chunks"] - norms * (n - n // row["tp"])
    g = row["gather_free"]
    assert g["commit_s"] > 0 and g["plan_s"] > 0 and g["runs_s"] > 0
    assert g["runs_worst_rank"] == 0


def test_rank_zero_has_the_most_runs():
    """The harness times rank 0 as the worst rank: under torch.chunk it holds the largest chunks."""
    from bench import scale
    from bench.models import llama_params, load_config

    params = llama_params(load_config("llama-8b")[0])
    layout, _ = scale.gather_free_plan(params)
    mesh = scale.mesh_for(64)
    counts = [scale.rank_runs(params, mesh, r, layout) for r in range(mesh.size)]
    assert max(counts) == counts[0]
    assert sum(b for _, b in counts) == layout.total_size  # every byte written once, replicas once


def test_scale_main_writes_json(tmp_path):
    import json

    from bench import scale

    data = scale.main(["--models", "llama-8b", "--ranks", "8", "--in-process", "--out", str(tmp_path / "s.json")])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [r["n"] for r in saved["rows"]] == [8]
    assert data["targets"] and all(c["ok"] for c in data["targets"] if c["target"])


def test_model_shapes_come_from_the_launcher_configs():
    from bench.models import LLAMA_CONFIGS, REPO, load_config

    for name, published in LLAMA_CONFIGS.items():
        cfg, source = load_config(name)
        assert {k: cfg[k] for k in published} == published
        if (REPO / "configs" / "model").is_dir():
            assert source.startswith("configs/model/"), f"{name}: expected the launcher's YAML, got {source}"
