"""Row assembly of column shards (``hf_storage.row_assembly``).

First the schedule alone, as data: random layouts, boxes and node placements are planned, then executed
by a small simulator (one byte array per node's slots, one per file) and the result compared with the
tensors' own bytes. Then real saves on 4 gloo ranks that pretend to be two nodes (``HF_STORAGE_NODE``),
through both APIs, twice (the second save reuses the slots), and ranks that fail half-way through.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

import hf_storage
from hf_storage import row_assembly
from hf_storage.box import Box
from hf_storage.layout import TensorSpec, plan
from hf_storage.verify import verify

from .dist_utils import run_ranks

# -- the schedule as data --------------------------------------------------------------------------


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """torch.chunk-style cuts of ``n`` into ``parts`` (offset, size); trailing parts may be empty."""
    step = -(-n // parts)
    return [(min(i * step, n), max(0, min(step, n - i * step))) for i in range(parts)]


def grid_boxes(shape, rows: int, cols: int):
    """Boxes of a rows x cols grid over dims 0 and 1, rank = r * cols + c."""
    out = {}
    for r, (ro, rs) in enumerate(split(shape[0], rows)):
        for c, (co, cs) in enumerate(split(shape[1], cols)):
            out[r * cols + c] = ((ro, co, *[0] * (len(shape) - 2)), (rs, cs, *shape[2:]))
    return out


def part(layout, fqn, offsets, sizes) -> row_assembly.Part:
    p = layout.tensors[fqn]
    return row_assembly.Part(fqn, Box(tuple(offsets), tuple(sizes)), p.spec.shape, p.spec.itemsize, p.file, p.offset)


def planned(layout, boxes_by_rank, nodes, slot):
    return row_assembly.schedule([[part(layout, *b) for b in boxes] for boxes in boxes_by_rank], nodes, slot)


def wanted(shape, offsets, sizes, itemsize) -> bool:
    return row_assembly.wanted(tuple(shape), Box(tuple(offsets), tuple(sizes)), itemsize)


def simulate(layout, boxes_by_rank, nodes, slot, data):
    """Execute every rank's schedule the way the ranks do, and each rank's direct rows; return file bytes."""
    scheds = planned(
        layout,
        [
            [
                b
                for b in boxes
                if wanted(layout.tensors[b[0]].spec.shape, b[1], b[2], layout.tensors[b[0]].spec.itemsize)
            ]
            for boxes in boxes_by_rank
        ],
        nodes,
        slot,
    )
    files = {f.name: bytearray(f.size) for f in layout.files}
    for node in set(nodes):
        rounds = {s.rounds for s, n in zip(scheds, nodes) if n == node and (s.copies or s.writes)}
        assert len(rounds) <= 1, "every rank of a node must meet the same number of times"
    slots = {n: bytearray(2 * slot) for n in set(nodes) if n is not None}
    written = {}
    for k in range(max(s.rounds for s in scheds)):
        for r, s in enumerate(scheds):  # copies of round k, every rank
            for c in s.copies:
                if c.round != k:
                    continue
                fqn, off, sz = next(b for b in boxes_by_rank[r] if b[0] == c.fqn)
                spec = layout.tensors[fqn].spec
                item = spec.itemsize
                band = torch.frombuffer(slots[nodes[r]], dtype=torch.uint8)[(k % 2) * slot + c.buf :][
                    : c.rows * math.prod(spec.shape[1:]) * item
                ].view(c.rows, *spec.shape[1:], item)
                for d in range(1, len(spec.shape)):
                    band = band.narrow(d, off[d], sz[d])
                src = data[fqn].view(torch.uint8).view(*spec.shape, item)
                for d in range(len(spec.shape)):
                    src = src.narrow(d, off[d] + (c.row0 if d == 0 else 0), c.rows if d == 0 else sz[d])
                band.copy_(src)
        for r, s in enumerate(scheds):  # after the barrier: the writes of round k
            for w in s.writes:
                if w.round == k:
                    at = (k % 2) * slot + w.buf
                    files[w.file][w.offset : w.offset + w.nbytes] = slots[nodes[r]][at : at + w.nbytes]
                    written[w.fqn] = written.get(w.fqn, 0) + w.nbytes
    for r, boxes in enumerate(boxes_by_rank):  # rows not handed over: written by their owner
        for fqn, off, sz in boxes:
            p = layout.tensors[fqn]
            item = p.spec.itemsize
            parts = row_assembly.direct_rows(sz[0], scheds[r].bands.get(fqn, ())) if len(sz) else [(0, 1)]
            for r0, n in parts:
                box = data[fqn].view(torch.uint8).view(*p.spec.shape, item)
                for d in range(len(sz)):
                    box = box.narrow(d, off[d] + (r0 if d == 0 else 0), n if d == 0 else sz[d])
                dst = torch.frombuffer(files[p.file], dtype=torch.uint8)[p.offset : p.offset + p.spec.nbytes]
                dst = dst.view(*p.spec.shape, item)
                for d in range(len(sz)):
                    dst = dst.narrow(d, off[d] + (r0 if d == 0 else 0), n if d == 0 else sz[d])
                dst.copy_(box)
    return files, scheds, written


def expected_files(layout, data):
    files = {f.name: bytearray(f.size) for f in layout.files}
    for name, p in layout.tensors.items():
        files[p.file][p.offset : p.offset + p.spec.nbytes] = data[name].reshape(-1).view(torch.uint8).numpy().tobytes()
    return files


def random_case(rng: random.Random):
    """A few tensors on a rows x cols grid of ranks, nodes of 1-4 ranks, some ranks without shared memory."""
    rows, cols = rng.choice([(1, 2), (1, 4), (2, 2), (2, 3), (4, 2), (1, 3)])
    world = rows * cols
    per_node = rng.choice([1, cols, world, 2])
    nodes = [("host", r // per_node) for r in range(world)]
    if rng.random() < 0.2:
        nodes[rng.randrange(world)] = None
    specs, data, boxes = [], {}, [[] for _ in range(world)]
    for i in range(rng.randint(1, 4)):
        dtype = rng.choice([torch.bfloat16, torch.float32, torch.int8, torch.float64])
        shape = (rng.randint(1, 40), rng.randint(1, 24), *([rng.randint(1, 5)] if rng.random() < 0.3 else []))
        name = f"t{i}"
        specs.append(TensorSpec(name, dtype, shape))
        data[name] = (torch.arange(math.prod(shape)) * (i + 7) % 251).to(dtype).reshape(shape)
        for r, (off, sz) in grid_boxes(shape, rows, cols).items():
            if all(sz):
                boxes[r].append((name, off, sz))
    layout = plan(specs, max_shard_size=rng.choice([None, 2000]))
    slot = rng.choice([64, 256, 1024, 2**20])
    return layout, boxes, nodes, slot, data


@pytest.mark.parametrize("seed", range(60))
def test_simulated_schedule_writes_every_byte_once(seed):
    layout, boxes, nodes, slot, data = random_case(random.Random(seed))
    files, scheds, written = simulate(layout, boxes, nodes, slot, data)
    assert files == expected_files(layout, data)
    for s in scheds:  # a rank's writes are in file order per tensor (the checksum fold needs it)
        for fqn in {w.fqn for w in s.writes}:
            starts = [w.start for w in s.writes if w.fqn == fqn]
            assert starts == sorted(starts)
    for s in scheds:
        for c in s.copies:
            assert c.buf % 64 == 0 and c.buf < slot
        for w in s.writes:
            assert w.buf + w.nbytes <= slot


def test_column_shards_on_one_node_are_assembled_and_shared_out_evenly():
    specs = [TensorSpec("w", torch.bfloat16, (64, 256))]  # rows of 512 bytes
    layout = plan(specs)
    boxes = [[("w", (0, 64 * r), (64, 64))] for r in range(4)]
    node = ("host", 1, 2)
    scheds = planned(layout, boxes, [node] * 4, slot=8192)
    assert all(s.rounds == 4 for s in scheds)  # 32 KiB in slots of 8 KiB
    assert all(s.bands == {"w": ((0, 64),)} for s in scheds)
    assert [sum(w.nbytes for w in s.writes) for s in scheds] == [8192] * 4


def test_bands_spanning_nodes_stay_direct_and_rows_longer_than_a_slot_too():
    layout = plan([TensorSpec("w", torch.float32, (8, 64)), TensorSpec("wide", torch.float32, (4, 4096))])
    boxes = [[("w", (0, 32 * r), (8, 32)), ("wide", (0, 2048 * r), (4, 2048))] for r in range(2)]
    scheds = planned(layout, boxes, [("a",), ("b",)], slot=4096)
    assert all(s.rounds == 0 and not s.bands for s in scheds)
    scheds = planned(layout, boxes, [("a",), ("a",)], slot=4096)
    assert all(set(s.bands) == {"w"} for s in scheds)  # wide rows (16 KiB) do not fit a 4 KiB slot


def test_a_rank_without_shared_memory_keeps_its_bands_direct():
    layout = plan([TensorSpec("w", torch.float32, (8, 64))])
    boxes = [[("w", (0, 32 * r), (8, 32))] for r in range(2)]
    scheds = planned(layout, boxes, [("a",), None], slot=4096)
    assert all(s.rounds == 0 and not s.bands for s in scheds)


def test_overlapping_owners_never_cover_a_band_exactly_and_stay_direct():
    layout = plan([TensorSpec("w", torch.float32, (8, 64))])
    pair = [[("w", (0, 32 * r), (8, 32))] for r in range(2)]
    scheds = planned(layout, pair + pair, [("a",)] * 4, 4096)
    assert all(s.rounds == 0 for s in scheds)


def test_node_name_groups_by_host_and_pid_namespace_or_the_setting(monkeypatch):
    assert row_assembly.node_name() is not None
    monkeypatch.setenv("HF_STORAGE_NODE", "node7")
    assert row_assembly.node_name().startswith("node7/")
    monkeypatch.setenv("HF_STORAGE_ROW_ASSEMBLY", "0")
    assert row_assembly.node_name() is None


def test_direct_rows_are_the_complement_of_the_handed_rows():
    assert row_assembly.direct_rows(10, [(2, 5)]) == [(0, 2), (5, 5)]
    assert row_assembly.direct_rows(10, [(0, 10)]) == []
    assert row_assembly.direct_rows(10, []) == [(0, 10)]


def test_wanted_only_boxes_of_short_runs():
    assert wanted((64, 256), (0, 0), (64, 128), 2)  # column shard
    assert not wanted((64, 256), (0, 0), (32, 256), 2)  # row shard: one run
    assert not wanted((64, 256), (0, 0), (1, 128), 2)  # a single row: one run
    assert not wanted((4, 2**20), (0, 0), (4, 2**19), 2)  # runs of 1 MiB: pwrite them
    assert not wanted((64,), (0,), (32,), 2)


# -- real saves on 4 ranks that pretend to be 2 nodes -----------------------------------------------


def full_state():
    g = torch.Generator().manual_seed(3)
    return {
        "attn.q": torch.randn(40, 96, generator=g).to(torch.bfloat16),  # 2-D blocks, rows split across "nodes"
        "mlp.up": torch.randn(33, 70, generator=g),  # uneven
        "experts": torch.randn(6, 10, 16, generator=g).to(torch.float16),  # 3-D
        "head": torch.randn(16, 64, generator=g),  # Shard(1) over all four ranks: bands span both nodes
        "norm": torch.randn(96, generator=g),  # replicated
    }


def ours_in_dev_shm() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("hf_storage")) if os.path.isdir("/dev/shm") else []


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _save_two_nodes(rank: int, world: int, out: str, api: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ["HF_STORAGE_NODE"] = f"node{rank // 2}"
    mesh = init_device_mesh("cpu", (2, 2))
    flat = init_device_mesh("cpu", (4,))
    sd = {}
    for name, t in full_state().items():
        if name == "head":
            sd[name] = distribute_tensor(t, flat, [Shard(1)])
        elif name == "norm":
            sd[name] = distribute_tensor(t, mesh, [Replicate(), Replicate()])
        else:
            sd[name] = distribute_tensor(t, mesh, [Shard(0), Shard(t.dim() - 1)])
    assembled, leftovers, fds = [], [], []
    for gen in range(3):  # later saves reuse the slots the first one mapped
        path = f"{out}/{api}-{gen}"
        if api == "verb":
            assembled.append(hf_storage.save(sd, path, budget=4096).assembled_bytes)
        else:
            dcp.save(sd, storage_writer=hf_storage.HuggingFaceStorageWriter(path, budget=4096))
        leftovers += ours_in_dev_shm()
        fds.append(open_fds())
    return {"assembled": assembled, "leftovers": leftovers, "fds": fds, "held": bool(row_assembly._OWN)}


@pytest.mark.parametrize("api", ["verb", "dcp"])
def test_two_nodes_of_two_ranks(tmp_path: Path, api: str):
    results = run_ranks(_save_two_nodes, 4, str(tmp_path), api)
    full = full_state()
    for gen in range(3):
        path = tmp_path / f"{api}-{gen}"
        from safetensors.torch import load_file

        got = {}
        for f in path.glob("*.safetensors"):
            got.update(load_file(f))
        assert set(got) == set(full) and all(torch.equal(got[k], full[k]) for k in full), f"save {gen} differs"
        report = verify(path)
        assert report.ok, report.format()
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(index["metadata"]["checksums"]["tensors"]) == len(full)
    for r in results:
        assert r["held"], "the slots stay mapped for the next save"
        assert r["leftovers"] == [], "no shared-memory file is left behind"
        assert r["fds"][1] == r["fds"][2], "a save leaves no file descriptor open"
    if api == "verb":  # q, up and experts go through the node's slots; head (bands across nodes) does not
        for rank, r in enumerate(results):
            mine = 0
            for name in ("attn.q", "mlp.up", "experts"):
                t = full[name]
                grid = (
                    grid_boxes(t.shape, 2, 2)
                    if t.dim() == 2
                    else {
                        q: ((o[0], 0, o[1]), (z[0], t.shape[1], z[1]))
                        for q, (o, z) in grid_boxes((t.shape[0], t.shape[2]), 2, 2).items()
                    }
                )
                mine += math.prod(grid[rank][1]) * t.element_size()
            assert r["assembled"] == [mine] * 3, f"rank {rank}"


def _fail_on_rank_1(rank: int, world: int, out: str, where: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    local = torch.randn(16, 8)
    if rank == 1:
        local = torch.empty(16, 8, device="meta")  # any read of its bytes fails
    sd = {"w": DTensor.from_local(local, mesh, [Shard(1)], run_check=False)}
    if where == "direct":  # a plain tensor (rank 0) and a row-sharded one keep the direct path
        v = torch.empty(4, 8, device="meta") if rank == 1 else torch.randn(4, 8)
        sd["v"] = DTensor.from_local(v, mesh, [Shard(0)], run_check=False)
    try:
        hf_storage.save(sd, out, budget=1024)
    except hf_storage.HFStorageError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("where", ["copy", "direct"])
def test_a_rank_failing_mid_assembly_fails_the_save_everywhere_without_a_hang(tmp_path: Path, where: str):
    out = tmp_path / "ckpt"
    errors = run_ranks(_fail_on_rank_1, 2, str(out), where, timeout=120)
    assert all("rank 1" in e for e in errors), errors
    assert not out.exists(), "nothing may be published"
    assert ours_in_dev_shm() == []


def _rank_1_cannot_read_the_plan(rank: int, world: int, out: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if rank == 1:

        def refuse(fd):
            raise OSError(5, "Input/output error")

        row_assembly._read_parts = refuse
    mesh = init_device_mesh("cpu", (world,))
    sd = {"w": distribute_tensor(torch.arange(64.0).reshape(8, 8), mesh, [Shard(1)])}
    try:
        hf_storage.save(sd, out)
    except hf_storage.HFStorageError as e:
        return str(e)
    return "no error"


def test_a_rank_that_cannot_read_its_nodes_plan_fails_the_save_without_a_hang(tmp_path: Path):
    out = tmp_path / "ckpt"
    errors = run_ranks(_rank_1_cannot_read_the_plan, 2, str(out), timeout=120)
    assert all("rank 1" in e and "HF_STORAGE_ROW_ASSEMBLY=0" in e for e in errors), errors
    assert not out.exists()
    assert ours_in_dev_shm() == []
