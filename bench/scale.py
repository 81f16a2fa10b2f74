"""Planning cost at thousands of ranks, by simulation: no processes, no tensor data (issue 6).

    make bench-scale                                         # Llama 8B/70B/405B, N = 8 ... 4096
    .venv/bin/python -m bench.scale --models llama-405b --ranks 4096
    .venv/bin/python -m bench.scale --dcp-max-items 5000000  # push the DCP path further (needs ~5 GB)

What is simulated, for a Llama model (``configs/model/*.yaml`` when present, else the HF config values in
:mod:`bench.models`) sharded FSDP x TP over a 2-D mesh of N ranks (TP = min(8, N) within a "node", FSDP =
N / TP; placements as torchtitan: FSDP Shard(0), TP Shard(0) for column-parallel weights, Shard(1) for
o_proj/down_proj, norms replicated over TP).

Gather-free path (``hf_storage.save``, the phases of ``hf_storage.pipeline``), every step as the real code
runs it:
  * plan: ``hf_storage.layout.plan`` over the global specs plus ``pipeline.fingerprint`` -- what *every*
    rank computes locally; independent of N;
  * cover: the exact-coverage proof of ``pipeline.plan`` (``hf_storage.shards.check_cover`` for every
    tensor: ``shards._dim_cover`` per tensor dimension, cached per distinct (dim size, placements, mesh
    sizes)), from a cold cache, as a rank's first save runs it; every rank runs it, and it grows with N;
  * pieces: the exact pieces a rank writes (``hf_storage.shards._pieces``, what ``pipeline.chunks_of``
    reads through ``shards.of``) on a mesh key (``hf_storage.shards.MeshKey``: sizes + this rank's
    coordinate; no DeviceMesh, no process group), from cold caches;
  * runs: ``engine.Place.span`` (``Box.runs`` and the file offsets, as ``engine.write_box`` computes them)
    for each piece a rank writes, for the first rank (coordinate (0, 0): under torch.chunk it holds the
    largest chunk of every tensor, so it is the worst rank), the middle rank and the last rank;
  * commit: rank 0 unpickles the N gathered ``pipeline.Report``s (each rank's per-tensor byte and CRC
    tally, ``pipeline.Tally.items()``, as ``hf_storage.save`` sends it), then ``pipeline.agree`` (errors,
    fingerprints, tally merge) and ``pipeline.finalize`` (exact byte coverage, checksums, index JSON) with the
    file writes and the publish of ``hf_storage.publish`` replaced by no-ops;
  * node: row-assembly planning on the node of rank 0 (its TP group): ``row_assembly.schedule`` over the
    ``row_assembly.Part``s of that node's ranks (those ``row_assembly.wanted``), as every rank of the node
    runs it after reading its mates' parts.
DCP coordinator path (``dcp.save`` with ``hf_storage.HuggingFaceStorageWriter``):
  * the N local ``SavePlan``s are built as DCP builds them (``WriteItem`` / ``TensorWriteData`` /
    ``ChunkStorageMetadata`` / ``TensorProperties``, one item per DTensor chunk with torch.chunk semantics as
    DTensor's ``compute_local_shape_and_global_offset`` gives it -- :func:`box`; planner_data = the flatten
    mapping; storage_data = the ``pipeline.Ready`` seat that ``prepare_local_plan`` attaches on a rank with
    column shards), outside the clock -- in a real job each rank builds its own;
  * torch's ``DefaultSavePlanner.create_global_plan`` (dedup of replicated items, metadata, validation);
  * ours: ``HuggingFaceStorageWriter.prepare_global_plan`` (``specs_from_plans``, layout, node mates, each
    rank's placements) with ``publish.prepare`` and ``pipeline.create_files`` replaced by no-ops (no file is
    created), then ``finish`` over N x T ``WriteResult``s (``pipeline.finalize``) with the index write and
    publish as no-ops.
  The DCP path is skipped where N x tensors exceeds ``--dcp-max-items`` (memory); its per-item cost is
  then extrapolated from the largest measured N and marked ``~``.

Time is wall-clock; memory is the peak growth of the step: tracemalloc for the small gather-free steps, the
RSS high-water mark (sampled every 2 ms) for the large coordinator steps, measured in a forked child per
(model, N) so one case cannot inherit another's heap. Output: tables on stdout, ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import pickle
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from .models import LLAMA_CONFIGS, Param, llama_params, load_config
from .rss import RssPeak

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RANKS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TARGETS = {"plan_s": 10.0, "plan_mb": 2000.0, "runs_s": 1.0, "cover_s": 1.0}
SHARD, REPLICATE = "S", "R"


# -- the simulated mesh --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mesh:
    dp: int
    tp: int

    @property
    def size(self) -> int:
        return self.dp * self.tp

    def coord(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.tp)


def mesh_for(n: int, tp: int = 8) -> Mesh:
    tp = min(tp, n)
    if n % tp:
        raise ValueError(f"{n} ranks do not split into TP groups of {tp}")
    return Mesh(n // tp, tp)


def placements(p: Param) -> tuple[tuple[str, int], tuple[str, int]]:
    """(FSDP, TP) placements: FSDP shards dim 0; TP shards ``tp_dim`` or replicates."""
    return (SHARD, 0), ((SHARD, p.tp_dim) if p.tp_dim is not None else (REPLICATE, -1))


def chunk_1d(size: int, parts: int, index: int) -> tuple[int, int]:
    """torch.chunk: ``parts`` pieces of ceil(size / parts); trailing ones short or empty."""
    step = -(-size // parts)
    start = min(index * step, size)
    return start, max(0, min(step, size - start))


@functools.lru_cache(maxsize=1 << 16)  # layers repeat: a few distinct (shape, placement, coordinate) per rank
def box(shape: tuple[int, ...], mesh: Mesh, coord: tuple[int, int], places) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offsets, sizes)`` of a rank's chunk, applying the mesh dimensions left to right as DTensor does.

    An empty chunk's offset along its empty dimension is that dimension's global size, as in DTensor.
    """
    offsets, sizes = [0] * len(shape), list(shape)
    for parts, c, (kind, dim) in zip((mesh.dp, mesh.tp), coord, places, strict=True):
        if kind == SHARD:
            start, sizes[dim] = chunk_1d(sizes[dim], parts, c)
            offsets[dim] += start
    return tuple(shape[d] if sizes[d] == 0 else o for d, o in enumerate(offsets)), tuple(sizes)


def writes(mesh: Mesh, coord: tuple[int, int], places) -> bool:
    """Replicated data is written once: by coordinate 0 of every mesh dimension that replicates it."""
    return all(c == 0 for c, (kind, _) in zip(coord, places, strict=True) if kind == REPLICATE)


def rank_chunks(params: list[Param], mesh: Mesh, rank: int, *, owned_only: bool):
    """``(param, offsets, sizes)`` of every chunk this rank holds (``owned_only``: that it writes)."""
    coord = mesh.coord(rank)
    for p in params:
        places = placements(p)
        if owned_only and not writes(mesh, coord, places):
            continue
        offsets, sizes = box(p.shape, mesh, coord, places)
        yield p, offsets, sizes


# -- what a rank writes: hf_storage.shards on a simulated mesh -------------------------------------
@functools.cache
def torch_placements(places) -> tuple:
    """The DTensor placements of :func:`placements`."""
    from torch.distributed.tensor.placement_types import Replicate, Shard

    return tuple(Shard(dim) if kind == SHARD else Replicate() for kind, dim in places)


def rank_pieces(params: list[Param], mesh: Mesh, rank: int):
    """``(param, box)`` of every piece this rank writes, as ``pipeline.chunks_of`` gets them from
    ``hf_storage.shards`` (replicas only at coordinate 0; empty pieces skipped)."""
    from hf_storage import shards

    sim = shards.MeshKey((mesh.dp, mesh.tp), tuple(mesh.coord(rank)), True)  # a root mesh: no submesh siblings
    for p in params:
        pieces, writes = shards._pieces(p.shape, sim, torch_placements(placements(p)), None)
        if writes:
            for piece in pieces:
                if not piece.box.empty:
                    yield p, piece.box


def clear_piece_caches() -> None:
    from hf_storage import shards

    shards._pieces.cache_clear()
    shards._indices.cache_clear()


def cover_keys(params: list[Param], mesh: Mesh) -> set:
    """The distinct ``(dim size, ((placement, mesh size), ...))`` that ``check_cover`` proves for the model."""
    from hf_storage import shards

    sizes, keys = (mesh.dp, mesh.tp), set()
    for p in params:
        pl = torch_placements(placements(p))
        for n, ms in zip(p.shape, shards._sharding(pl, None, len(p.shape))):
            keys.add((n, tuple((pl[m], sizes[m]) for m in ms)))
    return keys


def cover_proof(params: list[Param], mesh: Mesh) -> int:
    """``shards.check_cover`` for every tensor, on the simulated placements (its loop, minus the DTensor):
    ``_dim_cover`` per dimension. Returns the number of distinct proofs; raises if one fails."""
    from hf_storage import shards

    sizes = (mesh.dp, mesh.tp)
    for p in params:
        pl = torch_placements(placements(p))
        for d, (n, ms) in enumerate(zip(p.shape, shards._sharding(pl, None, len(p.shape)))):
            problem = shards._dim_cover(n, tuple((pl[m], sizes[m]) for m in ms))
            if problem:
                raise AssertionError(f"{p.name} dimension {d}: {problem}")
    return shards._dim_cover.cache_info().currsize


# -- measurement ---------------------------------------------------------------------------------
def _timed_rss(fn):
    gc.collect()
    with RssPeak() as mem:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return out, dt, mem.growth / 1e6


def _timed_trace(fn):
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, dt, peak / 1e6


def _timed_then_traced(fn):
    """Time ``fn`` untraced, then run it again under tracemalloc for its peak: exact even on a reused heap."""
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    _, _, mb = _timed_trace(fn)
    return out, dt, mb


def _best_time(fn, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@contextlib.contextmanager
def no_file_io():
    """Replace the few file operations of prepare/publish with no-ops; the logic around them runs as is.

    ``hf_storage.publish``: the lock + staging directory (``prepare``), small-file writes (``write_file``, the
    index), fsyncs, the atomic swap (``publish``) and ``abort``; ``pipeline.create_files`` (the files with
    their headers)."""
    from hf_storage import pipeline
    from hf_storage import publish as hp

    names = {hp: ("prepare", "write_file", "fsync_path", "publish", "abort"), pipeline: ("create_files",)}
    saved = {(mod, name): getattr(mod, name) for mod, ns in names.items() for name in ns}
    hp.prepare = lambda target, overwrite=True, lock_wait=0.0: fake_staging(target)
    hp.write_file = lambda directory, name, data, durable: None
    hp.fsync_path = lambda path, directory=False: None
    hp.publish = lambda staging, durable: None
    hp.abort = lambda staging: None
    pipeline.create_files = lambda directory, layout: True
    try:
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


def fake_staging(target="/nonexistent-hf-scale-sim"):
    """A ``publish.Staging`` naming directories that are never created, with no lock held."""
    from hf_storage import publish

    tmp = Path(tempfile.gettempdir()) / "hf-scale-sim-not-created"
    return publish.Staging(tmp, Path(target), publish.Lock(tmp.with_suffix(".lock"), None))


# -- gather-free path ----------------------------------------------------------------------------
def specs_of(params: list[Param]):
    import torch

    from hf_storage.layout import TensorSpec

    return [TensorSpec(p.name, torch.bfloat16, p.shape) for p in params]


def gather_free_plan(params: list[Param]):
    """What every rank runs before writing: the layout and its fingerprint."""
    from hf_storage import pipeline
    from hf_storage.layout import plan

    layout = plan(specs_of(params))
    return layout, pipeline.fingerprint(layout)


def rank_runs(params: list[Param], mesh: Mesh, rank: int, layout) -> tuple[int, int]:
    """The write runs of one rank's pieces, as ``engine.write_box`` computes them (``Place.span``: run starts
    as file offsets, run length): ``(runs, bytes)``."""
    from hf_storage.engine import Place

    runs = nbytes = 0
    for p, box in rank_pieces(params, mesh, rank):
        _, _, starts, length = Place(-1, layout.tensors[p.name].offset, p.shape).span(box, 2)
        runs += len(starts)
        nbytes += length * len(starts)
    return runs, nbytes


def node_parts(params: list[Param], mesh: Mesh, layout) -> list[list]:
    """The ``row_assembly.Part``s of each rank on the node of rank 0 (its TP group: dp coordinate 0), as
    ``pipeline.parts_for_assembly`` makes them: the pieces ``row_assembly.wanted`` takes (column shards)."""
    from hf_storage import row_assembly

    out = []
    for r in range(mesh.tp):
        mine = []
        for p, box in rank_pieces(params, mesh, r):
            if row_assembly.wanted(p.shape, box, 2):
                t = layout.tensors[p.name]
                mine.append(row_assembly.Part(p.name, box, p.shape, 2, t.file, t.offset))
        out.append(mine)
    return out


def node_schedule(parts: list[list]) -> tuple[int, int, int]:
    """Row-assembly planning on one node, as ``row_assembly.join`` runs it on each of the node's ranks:
    ``row_assembly.schedule`` over the node's parts. Returns ``(parts, bands handed over by the node's first
    rank, rounds)``."""
    from hf_storage import engine, row_assembly

    scheds = row_assembly.schedule(parts, ["node 0"] * len(parts), row_assembly.slot_size(engine.DEFAULT_BUDGET))
    first = scheds[0] if scheds else None
    return (
        sum(map(len, parts)),
        sum(len(v) for v in first.bands.values()) if first else 0,
        first.rounds if first else 0,
    )


def node_plan(params: list[Param], mesh: Mesh, layout) -> tuple[int, int, int]:
    """The node's parts (pieces from warm caches, as the rest of a rank's plan leaves them), then its schedule."""
    return node_schedule(node_parts(params, mesh, layout))


def rank_report(params: list[Param], mesh: Mesh, rank: int, fingerprint: str, rng: random.Random) -> bytes:
    """One rank's pickled ``pipeline.Report`` to the coordinator, as ``hf_storage.save`` builds it: the
    fingerprint and its ``pipeline.Tally`` rows, one ``(fqn, bytes, CRC share)`` per tensor it wrote."""
    from hf_storage import pipeline

    tally = pipeline.Tally()
    for p, box in rank_pieces(params, mesh, rank):
        tally.add(p.name, box.numel * 2, rng.getrandbits(32))
    report = pipeline.Report(rank, fingerprint, tally.items())
    return pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL)


def gather_free_commit(params: list[Param], mesh: Mesh, layout, fingerprint: str) -> dict:
    """Rank 0's side of agree + publish: unpickle N reports, ``pipeline.agree``, then ``pipeline.finalize``
    with file I/O stubbed."""
    from hf_storage import pipeline

    rng = random.Random(0)
    blobs = [rank_report(params, mesh, r, fingerprint, rng) for r in range(mesh.size)]
    opts, staging = pipeline.Options(), fake_staging()

    def run():
        reports = [pickle.loads(b) for b in blobs]
        with no_file_io():
            pipeline.finalize(staging, layout, pipeline.agree(reports), opts)

    _, dt, mb = _timed_rss(run)
    return {
        "commit_s": dt,
        "commit_mb": mb,
        "report_bytes": sum(map(len, blobs)),
        "report_bytes_max": max(map(len, blobs)),
    }


def run_gather_free(params: list[Param], mesh: Mesh, *, commit: bool) -> dict:
    from hf_storage import shards

    (layout, fp), plan_s, plan_mb = _timed_trace(lambda: gather_free_plan(params))
    plan_s = min(plan_s, _best_time(lambda: gather_free_plan(params)))
    out = {"plan_s": plan_s, "plan_mb": plan_mb, "files": len(layout.files), "ranks": {}}
    shards._dim_cover(3, (torch_placements(((SHARD, 0),)) + (2,),))  # torch's split ops warmed up, as on a rank
    shards._dim_cover.cache_clear()  # cold, as in a rank's first save (the cache then lasts the process)
    gc.collect()
    t0 = time.perf_counter()
    out["cover_keys"] = cover_proof(params, mesh)
    out["cover_s"] = time.perf_counter() - t0
    assert out["cover_keys"] == len(cover_keys(params, mesh))
    for label, rank in (("first", 0), ("middle", mesh.size // 2), ("last", mesh.size - 1)):

        def pieces(r=rank):
            clear_piece_caches()
            return sum(1 for _ in rank_pieces(params, mesh, r))

        count, _, pieces_mb = _timed_trace(pieces)
        pieces_s = _best_time(pieces)
        (runs, nbytes), _, mb = _timed_trace(lambda r=rank: rank_runs(params, mesh, r, layout))
        dt = _best_time(lambda r=rank: rank_runs(params, mesh, r, layout))
        out["ranks"][label] = {
            "rank": rank,
            "runs_s": dt,
            "runs_mb": mb,
            "runs": runs,
            "bytes": nbytes,
            "pieces": count,
            "pieces_s": pieces_s,
            "pieces_mb": pieces_mb,
        }
    (boxes, bands, rounds), _, mb = _timed_trace(lambda: node_plan(params, mesh, layout))
    out["node"] = {
        "s": _best_time(lambda: node_plan(params, mesh, layout)),
        "mb": mb,
        "boxes": boxes,
        "bands": bands,
        "rounds": rounds,
    }
    worst = max(out["ranks"].values(), key=lambda v: (v["runs"], v["bytes"]))
    out["runs_s"] = max(v["runs_s"] for v in out["ranks"].values())
    out["pieces_s"] = max(v["pieces_s"] for v in out["ranks"].values())
    out["runs_worst_rank"], out["runs_max"] = worst["rank"], worst["runs"]
    if commit:
        out.update(gather_free_commit(params, mesh, layout, fp))
    return out


# -- DCP coordinator path ------------------------------------------------------------------------
def local_save_plan(params: list[Param], mesh: Mesh, rank: int):
    """The SavePlan DCP's default planner makes on ``rank`` (one WriteItem per DTensor chunk, its box as
    DTensor's ``compute_local_shape_and_global_offset`` gives it), after our ``prepare_local_plan``: a rank
    with column shards attaches its ``pipeline.Ready`` seat (node = its TP group)."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    from hf_storage import dcp as hf_dcp
    from hf_storage import pipeline, row_assembly

    items, mapping = [], {}
    for p, offsets, sizes in rank_chunks(params, mesh, rank, owned_only=False):
        off = torch.Size(offsets)
        items.append(
            WriteItem(
                index=MetadataIndex(p.name, off),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=off, sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=torch.bfloat16),
                    size=torch.Size(p.shape),
                ),
            )
        )
        mapping[p.name] = (p.name,)
    plan = SavePlan(items, planner_data=mapping)
    if any(True for _ in hf_dcp._column_items(plan)):
        seat = row_assembly.Seat(f"node {rank // mesh.tp}", 100_000 + rank, 10, 11)
        plan = dataclasses.replace(plan, storage_data=pipeline.Ready(rank, seat=seat))
    return plan


def unpickle_estimate(per_rank: list, sample: int = 16) -> tuple[float, float]:
    """What DCP's gather costs the coordinator: seconds to unpickle all N ranks' objects, and their bytes.

    Estimated from ``sample`` evenly spaced ranks, scaled by N / sample, with the garbage collector off. A
    lower bound: unpickling millions of objects into one heap also triggers full garbage collections (about
    2.7x slower for 4.7M objects in the gather-free commit measurement); timed here, one such collection
    over the simulation's own heap would be multiplied by N / sample and swamp the estimate.
    """
    n = len(per_rank)
    idx = sorted({round(i * (n - 1) / max(1, sample - 1)) for i in range(min(sample, n))})
    blobs = [pickle.dumps(per_rank[i], protocol=pickle.HIGHEST_PROTOCOL) for i in idx]
    gc.disable()
    try:
        t0 = time.perf_counter()
        for b in blobs:
            pickle.loads(b)
        dt = time.perf_counter() - t0
    finally:
        gc.enable()
    k = n / len(idx)
    return dt * k, sum(map(len, blobs)) * k


def run_dcp(params: list[Param], mesh: Mesh, *, torch_planner: bool = True) -> dict:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.storage import WriteResult

    import hf_storage

    t0 = time.perf_counter()
    plans = [local_save_plan(params, mesh, r) for r in range(mesh.size)]
    out = {
        "items": sum(len(p.items) for p in plans),
        "build_s": time.perf_counter() - t0,
        "plan_bytes_rank0": len(pickle.dumps(plans[0], protocol=pickle.HIGHEST_PROTOCOL)),
    }
    out["gather_plans_s"], out["gather_plans_bytes"] = unpickle_estimate(plans)
    if torch_planner:
        (final, metadata), out["torch_global_s"], out["torch_global_mb"] = _timed_rss(
            lambda: DefaultSavePlanner().create_global_plan(plans)
        )
    else:  # torch's dedup alone, so our step sees the same (deduplicated) plans as in a real save
        from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans

        final, out["torch_dedup_s"], _ = _timed_rss(lambda: dedup_save_plans(plans))
        metadata = None
    out["items_after_dedup"] = sum(len(p.items) for p in final)
    writer = hf_storage.HuggingFaceStorageWriter("/nonexistent-hf-scale-sim")
    writer.set_up_storage_writer(True)
    with no_file_io():
        ours, out["plan_s"], out["plan_mb"] = _timed_then_traced(lambda: writer.prepare_global_plan(final))
    out["layout"] = writer.layout
    out["node_groups"] = sum(1 for p in ours if p.storage_data.mates)
    rng = random.Random(0)
    results = [
        [
            WriteResult(
                index=it.index,
                size_in_bytes=math.prod(it.tensor_data.chunk.sizes) * 2,
                storage_data=((it.index.fqn, math.prod(it.tensor_data.chunk.sizes) * 2, rng.getrandbits(32)),),
            )  # the writer's per-item tally rows
            for it in p.items
        ]
        for p in ours
    ]
    out["gather_results_s"], out["gather_results_bytes"] = unpickle_estimate(results)
    staging = writer._staging

    def finish():
        writer._staging = staging  # finish() hands the staging over to publish: give it back for the rerun
        writer.finish(metadata, results)

    with no_file_io():
        _, out["finish_s"], out["finish_mb"] = _timed_then_traced(finish)
    writer._staging = None
    out["placements_ok"] = all(
        p.storage_data.placed.get(it.index.fqn) == writer.layout.tensors[it.index.fqn] for p in ours for it in p.items
    )
    return out


# -- one case, and the sweep ---------------------------------------------------------------------
def run_case(
    model: str,
    n: int,
    *,
    tp: int = 8,
    dcp_max_items: int = 1_200_000,
    torch_max_items: int = 300_000,
    commit: bool = True,
    keep_layout: bool = False,
) -> dict:
    import torch  # noqa: F401  -- imported before any clock or tracemalloc starts
    import torch.distributed.checkpoint.default_planner  # noqa: F401

    import hf_storage  # noqa: F401

    gc.collect()
    gc.freeze()  # the imported modules: later (untimed) collections before each step skip them
    cfg, source = load_config(model)
    params = llama_params(cfg)
    mesh = mesh_for(n, tp)
    res = {
        "model": model,
        "config_source": source,
        "n": n,
        "dp": mesh.dp,
        "tp": mesh.tp,
        "tensors": len(params),
        "chunks": n * len(params),
        "gather_free": run_gather_free(params, mesh, commit=commit),
    }
    if n * len(params) <= dcp_max_items:
        dcp = run_dcp(params, mesh, torch_planner=n * len(params) <= torch_max_items)
        layout = dcp.pop("layout")
        res["dcp"] = dcp
        if keep_layout:
            res["dcp_layout"] = layout
    else:
        res["dcp"] = None
    return res


def _in_child(fn, *args, **kwargs):
    """Run in a forked child (fresh heap, survives nothing but a result); re-raise its error here."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def target():
        try:
            send.send(("ok", fn(*args, **kwargs)))
        except BaseException as e:  # pragma: no cover - reported to the parent
            import traceback

            send.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))

    p = ctx.Process(target=target)
    p.start()
    status, value = recv.recv() if recv.poll(None) else ("error", "no result")
    p.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def _extrapolate(rows: list[dict]) -> None:
    """DCP rows skipped for memory: scale the largest measured row of the model by chunks (marked ~)."""
    by_model: dict[str, dict] = {}
    for r in rows:
        if r["dcp"] is not None:
            by_model[r["model"]] = r
    for r in rows:
        ref = by_model.get(r["model"])
        if r["dcp"] is None and ref is not None:
            k = r["chunks"] / ref["chunks"]
            r["dcp_estimate"] = {
                key: ref["dcp"][key] * k
                for key in (
                    "plan_s",
                    "plan_mb",
                    "finish_s",
                    "finish_mb",
                    "build_s",
                    "gather_plans_s",
                    "gather_plans_bytes",
                    "gather_results_s",
                )
                if key in ref["dcp"]
            }


def growth_exponent(rows: list[dict], path: str, key: str, min_chunks: int = 100_000) -> float | None:
    """Least-squares slope of log(key) against log(ranks x tensors) over the large rows; 1 = linear.

    Rows below ``min_chunks`` are left out: there fixed costs (milliseconds) hide the growth.
    """
    pts = [
        (math.log(r["chunks"]), math.log(r[path][key]))
        for r in rows
        if r.get(path) and r[path].get(key, 0) > 0.002 and r["chunks"] >= min_chunks
    ]
    if len(pts) < 3:
        return None
    mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def _fmt(v, spec: str, est: bool = False) -> str:
    width = int(spec.split(".")[0] or 0)
    if v is None:
        return "-".rjust(width)
    text = format(v, spec).strip()
    return (("~" if est else "") + text).rjust(width)


def tables(rows: list[dict]) -> str:
    head1 = (
        f"{'model':<11} {'N':>5} {'mesh':>8} {'tensors':>7} {'chunks':>9} | {'plan s':>7} {'plan MB':>7} | "
        f"{'cover s':>7} {'keys':>4} | {'pieces s':>8} | "
        f"{'runs s':>7} {'runs':>8} {'rank':>5} | {'commit s':>8} {'commit MB':>9} {'reports MB':>10} | "
        f"{'node s':>7} {'node boxes':>10}"
    )
    out = [
        "GATHER-FREE PATH (hf_storage.save): plan = layout.plan + pipeline.fingerprint on every rank; "
        "cover = exact-coverage proof (shards._dim_cover over the distinct keys, cold cache) on every rank; "
        "pieces = shards._pieces of a rank's tensors (cold caches), slowest of first/middle/last rank; "
        "runs = engine.Place.span of every piece, slowest of first/middle/last rank, runs and rank = the one "
        "with most runs; commit = rank 0 unpickles N pipeline.Reports + agree + finalize; "
        "node = row-assembly planning on one node (8 TP ranks' column parts, row_assembly.schedule)",
        head1,
        "-" * len(head1),
    ]
    for r in rows:
        g = r["gather_free"]
        out.append(
            f"{r['model']:<11} {r['n']:>5} {str(r['dp']) + 'x' + str(r['tp']):>8} {r['tensors']:>7} "
            f"{r['chunks']:>9} | {g['plan_s']:7.3f} {g['plan_mb']:7.1f} | "
            f"{_fmt(g.get('cover_s'), '7.3f')} {g.get('cover_keys', '-'):>4} | {_fmt(g.get('pieces_s'), '8.3f')} | "
            f"{g['runs_s']:7.3f} "
            f"{g['runs_max']:>8} {g['runs_worst_rank']:>5} | {_fmt(g.get('commit_s'), '8.2f')} "
            f"{_fmt(g.get('commit_mb'), '9.1f')} {_fmt(g.get('report_bytes', 0) / 1e6, '10.1f')} | "
            f"{_fmt(g.get('node', {}).get('s'), '7.3f')} {g.get('node', {}).get('boxes', '-'):>10}"
        )
    head2 = (
        f"{'model':<11} {'N':>5} {'chunks':>9} | {'build s':>8} {'gather s':>8} {'gath MB':>8} | "
        f"{'torch glob s':>12} {'torch MB':>9} | {'ours plan s':>11} {'ours MB':>8} | {'finish s':>9} "
        f"{'finish MB':>9} {'res gath s':>10}"
    )
    out += [
        "",
        "DCP COORDINATOR PATH: build = N local SavePlans (outside the clock; each rank builds its own); "
        "gather = coordinator unpickling the N plans (estimated from 16 ranks, a lower bound) and their size; "
        "torch glob = DefaultSavePlanner.create_global_plan (run up to --torch-max-items); "
        "ours = HuggingFaceStorageWriter.prepare_global_plan; finish = writer.finish over N x T WriteResults; "
        "res gath = unpickling those results (estimated); ~ = extrapolated linearly from the largest measured N",
        head2,
        "-" * len(head2),
    ]
    for r in rows:
        d, est = r["dcp"], False
        if d is None:
            d, est = r.get("dcp_estimate") or {}, True
        gb = d.get("gather_plans_bytes")
        out.append(
            f"{r['model']:<11} {r['n']:>5} {r['chunks']:>9} | {_fmt(d.get('build_s'), '8.2f', est)} "
            f"{_fmt(d.get('gather_plans_s'), '8.2f', est)} {_fmt(gb / 1e6 if gb else None, '8.0f', est)} | "
            f"{_fmt(d.get('torch_global_s'), '12.2f', est)} {_fmt(d.get('torch_global_mb'), '9.0f', est)} | "
            f"{_fmt(d.get('plan_s'), '11.2f', est)} {_fmt(d.get('plan_mb'), '8.0f', est)} | "
            f"{_fmt(d.get('finish_s'), '9.2f', est)} {_fmt(d.get('finish_mb'), '9.0f', est)} "
            f"{_fmt(d.get('gather_results_s'), '10.2f', est)}"
        )
    return "\n".join(out)


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets on the largest case (405B at the largest N when present); torch's own steps as info."""
    checks: list[dict] = []
    if not rows:
        return checks
    big = max(rows, key=lambda r: (r["tensors"], r["n"]))
    g, name = big["gather_free"], f"{big['model']} N={big['n']}"

    def add(what, value, limit, unit, note="", target=True):
        if value is not None:
            checks.append(
                {
                    "check": what,
                    "value": value,
                    "limit": limit,
                    "unit": unit,
                    "note": note,
                    "target": target,
                    "ok": value < limit,
                }
            )

    add(f"{name} gather-free plan (every rank)", g["plan_s"], TARGETS["plan_s"], "s")
    add(f"{name} gather-free plan memory", g["plan_mb"], TARGETS["plan_mb"], "MB")
    add(f"{name} per-rank run computation (worst rank)", g["runs_s"], TARGETS["runs_s"], "s")
    add(f"{name} exact-coverage proof (shards._dim_cover, every rank, cold)", g.get("cover_s"), TARGETS["cover_s"], "s")
    add(
        f"{name} exact pieces of a rank's tensors (shards._pieces, worst rank, cold)",
        g.get("pieces_s"),
        TARGETS["runs_s"],
        "s",
    )
    if "node" in g:
        add(f"{name} row-assembly planning on a node (every rank of it)", g["node"]["s"], TARGETS["runs_s"], "s")
    add(f"{name} gather-free commit on rank 0 (unpickle N reports + tally)", g.get("commit_s"), TARGETS["plan_s"], "s")
    add(f"{name} gather-free commit memory on rank 0", g.get("commit_mb"), TARGETS["plan_mb"], "MB", "RSS growth")
    d, note = big["dcp"], "measured"
    if d is None:
        d, note = big.get("dcp_estimate") or {}, "extrapolated linearly from the largest measured N"
    add(f"{name} DCP coordinator: ours prepare_global_plan", d.get("plan_s"), TARGETS["plan_s"], "s", note)
    add(f"{name} DCP coordinator: ours prepare_global_plan memory", d.get("plan_mb"), TARGETS["plan_mb"], "MB", note)
    add(
        f"{name} DCP coordinator: ours finish (tally of N x T results)", d.get("finish_s"), TARGETS["plan_s"], "s", note
    )
    add(
        f"{name} DCP coordinator: unpickling the N gathered plans (torch's gather, est.)",
        d.get("gather_plans_s"),
        TARGETS["plan_s"],
        "s",
        note + "; a lower bound",
        target=False,
    )
    if "torch_global_s" in d:
        add(
            f"{name} DCP coordinator: torch create_global_plan (not ours)",
            d["torch_global_s"],
            TARGETS["plan_s"],
            "s",
            note,
            target=False,
        )
    for path, key, ours in (
        ("dcp", "plan_s", True),
        ("dcp", "finish_s", True),
        ("gather_free", "commit_s", True),
        ("dcp", "torch_global_s", False),
    ):
        e = growth_exponent(rows, path, key)
        add(
            f"growth of {path}.{key} with ranks x tensors (log-log slope; 1 = linear)",
            e,
            1.15,
            "",
            "fit over measured rows with >= 100k chunks",
            target=ours,
        )
    return checks


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=list(LLAMA_CONFIGS), choices=list(LLAMA_CONFIGS))
    p.add_argument("--ranks", type=int, nargs="+", default=list(DEFAULT_RANKS))
    p.add_argument("--tp", type=int, default=8, help="tensor-parallel degree (capped at N)")
    p.add_argument(
        "--dcp-max-items",
        type=int,
        default=1_200_000,
        help="skip (and extrapolate) the DCP path beyond this many write items (memory)",
    )
    p.add_argument("--no-commit", action="store_true", help="skip the gather-free commit simulation")
    p.add_argument(
        "--torch-max-items",
        type=int,
        default=300_000,
        help="run torch's create_global_plan only up to this many write items (it grows superlinearly); "
        "beyond, only its dedup step runs",
    )
    p.add_argument("--in-process", action="store_true", help="no forked child per case (memory figures mix)")
    p.add_argument("--out", default=str(RESULTS / "scale.json"))
    a = p.parse_args(argv)
    if not a.in_process:  # import once here: every forked child shares the modules instead of importing them
        import torch  # noqa: F401
        import torch.distributed.checkpoint.default_planner  # noqa: F401

        import hf_storage  # noqa: F401

        gc.collect()
        gc.freeze()
    rows = []
    t0 = time.perf_counter()
    for model in a.models:
        for n in a.ranks:
            kw = dict(tp=a.tp, dcp_max_items=a.dcp_max_items, torch_max_items=a.torch_max_items, commit=not a.no_commit)
            r = run_case(model, n, **kw) if a.in_process else _in_child(run_case, model, n, **kw)
            g = r["gather_free"]
            print(
                f"{time.perf_counter() - t0:7.1f}s {model} N={n}: plan {g['plan_s']:.3f} s, "
                f"cover {g['cover_s']:.3f} s, pieces {g['pieces_s']:.3f} s, runs {g['runs_s']:.3f} s"
                + (f", commit {g['commit_s']:.2f} s" if "commit_s" in g else "")
                + (f", DCP ours {r['dcp']['plan_s']:.2f} s / {r['dcp']['plan_mb']:.0f} MB" if r["dcp"] else ""),
                flush=True,
            )
            rows.append(r)
    _extrapolate(rows)
    checks = check_targets(rows)
    print("\n" + tables(rows) + "\n\nTARGETS")
    for c in checks:
        tag = ("met" if c["ok"] else "MISSED") if c["target"] else "info"
        print(
            f"  [{tag}] {c['check']}: {c['value']:.3g} {c['unit']} "
            f"(limit {c['limit']:g}{(' ' + c['unit']) if c['unit'] else ''}){'; ' + c['note'] if c['note'] else ''}"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "rows": rows,
        "targets": checks,
        "wall_s": time.perf_counter() - t0,
    }
    out.write_text(json.dumps(data, indent=1, default=str))
    print(f"\nwrote {out} ({data['wall_s']:.0f} s)")
    return data


if __name__ == "__main__":
    main()
