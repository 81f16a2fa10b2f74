"""Multi-process round trips (gloo): save at one world size and placement, load at another, compare bits.

The matrix is data (tests/matrix.py): placements x every dtype x shapes (uneven, fewer rows than ranks,
3-D, empty, 0-dim, 1-D). Every saved file is also read with plain ``safetensors`` and checked against the
spec (aligned header, ``format: pt``, data contiguous in header order).
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

import hf_storage
from hf_storage.layout import INDEX_NAME
from tests import matrix
from tests.dist_utils import run_ranks


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints saved at world sizes 1, 2 and 4 with every placement, by the verb and by DCP."""
    root = str(tmp_path_factory.mktemp("roundtrip"))
    for ws in (1, 2, 4):
        run_ranks(matrix.save_worker, ws, root, matrix.placements_for(ws))
    return root


def _dirs(root, ws):
    return [f"{root}/{kind}-ws{ws}-{p}" for kind in ("verb", "dcp") for p in matrix.placements_for(ws)]


def check_spec(directory: str) -> None:
    """Spec details and a bitwise comparison through plain safetensors."""
    with open(os.path.join(directory, INDEX_NAME)) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert not [n for n in os.listdir(directory) if n not in files and n != INDEX_NAME], os.listdir(directory)
    seen = set()
    for name in files:
        path = os.path.join(directory, name)
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            head = json.loads(fh.read(n))
        assert (8 + n) % 8 == 0
        assert head.pop("__metadata__") == {"format": "pt"}
        pos = 0
        for tname, entry in head.items():  # header order == data order, contiguous
            assert entry["data_offsets"][0] == pos, (name, tname)
            pos = entry["data_offsets"][1]
        assert os.path.getsize(path) == 8 + n + pos
        with safe_open(path, framework="pt") as st:
            for tname in st.keys():
                dt = getattr(torch, tname.split(".")[0])
                shape = matrix.SHAPES[tname.split(".")[1]]
                assert matrix.same_bits(st.get_tensor(tname), matrix.reference(tname, dt, shape)), tname
                seen.add(tname)
    assert seen == {n for n, _, _ in matrix.case_names()}
    assert index["metadata"]["total_size"] == sum(
        matrix.reference(n, dt, s).numel() * matrix.reference(n, dt, s).element_size()
        for n, dt, s in matrix.case_names()
    )


@pytest.mark.parametrize("ws", [1, 2, 4])
def test_saved_files_follow_the_spec_and_match_bitwise(saved, ws):
    for d in _dirs(saved, ws):
        check_spec(d)


def test_verb_and_dcp_writer_produce_identical_files(saved):
    for ws in (1, 2, 4):
        for p in matrix.placements_for(ws):
            a, b = f"{saved}/verb-ws{ws}-{p}", f"{saved}/dcp-ws{ws}-{p}"
            for name in sorted(os.listdir(a)):
                if name.endswith(".safetensors"):
                    with open(f"{a}/{name}", "rb") as fa, open(f"{b}/{name}", "rb") as fb:
                        assert fa.read() == fb.read(), (ws, p, name)


def test_same_data_gives_identical_files_at_every_world_size_and_layout(saved):
    ref = f"{saved}/verb-ws1-rows"
    names = sorted(n for n in os.listdir(ref) if n.endswith(".safetensors"))
    for ws in (2, 4):
        for d in _dirs(saved, ws):
            assert sorted(n for n in os.listdir(d) if n.endswith(".safetensors")) == names
            for n in names:
                with open(f"{ref}/{n}", "rb") as fa, open(f"{d}/{n}", "rb") as fb:
                    assert fa.read() == fb.read(), (d, n)


@pytest.mark.parametrize("save_ws,load_ws", [(2, 4), (4, 2), (1, 4), (4, 1)])
def test_load_at_another_world_size_and_placement(saved, save_ws, load_ws):
    sources = [f"{saved}/verb-ws{save_ws}-{p}" for p in ("rows", "cols")] + [f"{saved}/dcp-ws{save_ws}-last"]
    if save_ws == 4:
        sources.append(f"{saved}/verb-ws4-2d_rows_cols")
    results = run_ranks(matrix.load_worker, load_ws, sources, matrix.placements_for(load_ws))
    failures = {f"rank {r}: {k}": v for r, res in enumerate(results) for k, v in res.items()}
    assert not failures, failures


def test_plain_tensors_in_one_process(saved, tmp_path):
    """save_distributed=False with a full state dict in one process, through DCP and the verb."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint import save as dcp_save

    full = {n: matrix.reference(n, dt, s) for n, dt, s in matrix.case_names()}
    dcp_save(full, storage_writer=hf_storage.HuggingFaceStorageWriter(str(tmp_path / "plain")))
    check_spec(str(tmp_path / "plain"))
    for src in (str(tmp_path / "plain"), f"{saved}/verb-ws4-2d_repl_rows"):
        target = {n: torch.empty_like(t) for n, t in full.items()}
        dcp_load(target, storage_reader=hf_storage.HuggingFaceStorageReader(src))
        assert [n for n in full if not matrix.same_bits(full[n], target[n])] == []
        target = {n: torch.empty_like(t) for n, t in full.items()}
        hf_storage.load(target, src)
        assert [n for n in full if not matrix.same_bits(full[n], target[n])] == []


def test_matrix_size():
    cases = len(list(matrix.case_names()))
    assert cases == len(hf_storage.dtypes.SUPPORTED_DTYPES) * len(matrix.SHAPES) - len(hf_storage.dtypes.PACKED) >= 100
