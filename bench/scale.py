"""Planning cost at thousands of ranks, by simulation: no processes, no tensor data (issue 6).

    make bench-scale                                         # Llama 8B/70B/405B, N = 8 ... 4096
    .venv/bin/python -m bench.scale --models llama-405b --ranks 4096
    .venv/bin/python -m bench.scale --dcp-max-items 5000000  # push the DCP path further (needs ~5 GB)

What is simulated, for a Llama model (``configs/model/*.yaml`` when present, else the HF config values in
:mod:`bench.models`) sharded FSDP x TP over a 2-D mesh of N ranks (TP = min(8, N) within a "node", FSDP =
N / TP; placements as torchtitan: FSDP Shard(0), TP Shard(0) for column-parallel weights, Shard(1) for
o_proj/down_proj, norms replicated over TP). Every rank's chunk box is computed here with torch.chunk
semantics, as DTensor's ``Shard`` does (mesh dimensions left to right; an empty chunk sits at the end).

Gather-free path (``hf_storage.save``), every step as the real code runs it:
  * plan: ``hf_storage.layout.plan`` over the global specs plus the layout fingerprint -- what *every*
    rank computes locally; independent of N;
  * runs: ``hf_storage.layout.chunk_runs`` (and the file offsets) for each chunk a rank writes, for the
    first rank (coordinate (0, 0): under torch.chunk it holds the largest chunk of every tensor, so it is
    the worst rank), the middle rank and the last rank;
  * commit: rank 0 unpickles the N gathered reports (each rank's per-tensor byte and checksum tally, as
    ``hf_storage.save`` sends it) and runs ``hf_storage.api._commit_reports`` (fingerprint check, byte
    tally, checksum merge); the index write and the publish rename are replaced by no-ops.
DCP coordinator path (``dcp.save`` with ``hf_storage.HuggingFaceStorageWriter``):
  * the N local ``SavePlan``s are built as DCP builds them (``WriteItem`` / ``TensorWriteData`` /
    ``ChunkStorageMetadata`` / ``TensorProperties``, one item per chunk, planner_data = the flatten
    mapping), outside the clock -- in a real job each rank builds its own;
  * torch's ``DefaultSavePlanner.create_global_plan`` (dedup of replicated items, metadata, validation);
  * ours: ``HuggingFaceStorageWriter.prepare_global_plan`` with ``hf_storage.writer.create_files`` and the
    staging directory creation replaced by no-ops (no file is created), then ``finish`` over N x T
    ``WriteResult``s with the index write and publish as no-ops.
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
TARGETS = {"plan_s": 10.0, "plan_mb": 2000.0, "runs_s": 1.0}
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
    """Replace the few file operations of planning/commit with no-ops; the logic around them runs as is."""
    import hf_storage.commit as hc
    import hf_storage.writer as hw

    saved = {(hw, "create_files"): hw.create_files, (hc, "begin"): hc.begin,
             (hc, "write_file"): hc.write_file, (hc, "publish"): hc.publish}
    tmp = Path(tempfile.gettempdir()) / "hf-scale-sim-not-created"
    hw.create_files = lambda staging, layout: None
    hc.begin = lambda target, overwrite=True: tmp
    hc.write_file = lambda directory, name, data, durable: None
    hc.publish = lambda staging, target, durable: None
    try:
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


# -- gather-free path ----------------------------------------------------------------------------
def specs_of(params: list[Param]):
    import torch

    from hf_storage.layout import TensorSpec

    return [TensorSpec(p.name, torch.bfloat16, p.shape) for p in params]


def gather_free_plan(params: list[Param]):
    """What every rank runs before writing: the layout and its fingerprint."""
    from hf_storage import api
    from hf_storage.layout import plan

    layout = plan(specs_of(params))
    return layout, api._fingerprint(layout)


def rank_runs(params: list[Param], mesh: Mesh, rank: int, layout) -> tuple[int, int]:
    """The write runs of one rank's chunks, as ``write_box`` computes them: ``(runs, bytes)``."""
    from hf_storage.layout import chunk_runs

    runs = nbytes = 0
    for p, offsets, sizes in rank_chunks(params, mesh, rank, owned_only=True):
        starts, length = chunk_runs(p.shape, offsets, sizes)
        _ = starts * 2 + layout.tensors[p.name].offset  # absolute file offsets, as _dispatch computes them
        runs += len(starts)
        nbytes += length * 2 * len(starts)
    return runs, nbytes


def node_exchange_plan(params: list[Param], mesh: Mesh, layout) -> tuple[int, int]:
    """Row-assembly planning on the node of rank 0 (its TP group), as ``hf_storage.exchange.arrange`` runs it
    on each of that node's ranks: ``(boxes, bands handed over by rank 0)``."""
    from hf_storage import exchange

    boxes = [[] for _ in range(mesh.size)]
    nodes = [None] * mesh.size
    for r in range(mesh.tp):  # the node's ranks: dp coordinate 0
        nodes[r] = "node 0"
        for p, offsets, sizes in rank_chunks(params, mesh, r, owned_only=True):
            if exchange.wants(p.shape, offsets, sizes, 2):
                t = layout.tensors[p.name]
                boxes[r].append(exchange.Box(p.name, offsets, sizes, p.shape, 2, t.file, t.offset))
    sched = exchange.plan_exchange(boxes, nodes, exchange.slot_size(64 * 2**20), "t")[0]
    return sum(map(len, boxes)), sum(len(v) for v in sched.bands.values())


def _chunk_result_factory():
    """``make(fqn, nbytes, crc)`` building the writer's ChunkResult, with a crc only if it has that field."""
    from hf_storage.writer import ChunkResult

    if "crc" in {f.name for f in dataclasses.fields(ChunkResult)}:
        return lambda fqn, nbytes, crc: ChunkResult(fqn=fqn, nbytes=nbytes, crc=crc)
    return lambda fqn, nbytes, crc: ChunkResult(fqn=fqn, nbytes=nbytes)


def rank_report(params: list[Param], mesh: Mesh, rank: int, fingerprint: str, rng: random.Random) -> bytes:
    """One rank's pickled report to the coordinator, as ``hf_storage.save`` builds it.

    With ``hf_storage.writer.tally`` (current code): the fingerprint and one ``(fqn, bytes, crc)`` row per
    tensor the rank wrote; without it (older code): one ``ChunkResult`` per written chunk.
    """
    from hf_storage import writer

    make = _chunk_result_factory()
    results = [make(p.name, math.prod(sizes) * 2, rng.getrandbits(32))
               for p, _, sizes in rank_chunks(params, mesh, rank, owned_only=True)]
    if hasattr(writer, "tally"):
        results = [(k, *v) for k, v in writer.tally(results).items()]
    return pickle.dumps((fingerprint, results), protocol=pickle.HIGHEST_PROTOCOL)


def gather_free_commit(params: list[Param], mesh: Mesh, layout, fingerprint: str) -> dict:
    """Rank 0's side of the commit: unpickle N reports, then ``_commit_reports`` with file I/O stubbed."""
    from hf_storage import api

    rng = random.Random(0)
    blobs = [rank_report(params, mesh, r, fingerprint, rng) for r in range(mesh.size)]

    def run():
        reports = [pickle.loads(b) for b in blobs]
        with no_file_io():
            api._commit_reports(reports, Path("/nonexistent-staging"), "/nonexistent", layout, False, None)

    _, dt, mb = _timed_rss(run)
    return {"commit_s": dt, "commit_mb": mb, "report_bytes": sum(map(len, blobs)),
            "report_bytes_max": max(map(len, blobs))}


def run_gather_free(params: list[Param], mesh: Mesh, *, commit: bool) -> dict:
    (layout, fp), plan_s, plan_mb = _timed_trace(lambda: gather_free_plan(params))
    plan_s = min(plan_s, _best_time(lambda: gather_free_plan(params)))
    out = {"plan_s": plan_s, "plan_mb": plan_mb, "files": len(layout.files), "ranks": {}}
    for label, rank in (("first", 0), ("middle", mesh.size // 2), ("last", mesh.size - 1)):
        (runs, nbytes), _, mb = _timed_trace(lambda r=rank: rank_runs(params, mesh, r, layout))
        dt = _best_time(lambda r=rank: rank_runs(params, mesh, r, layout))
        out["ranks"][label] = {"rank": rank, "runs_s": dt, "runs_mb": mb, "runs": runs, "bytes": nbytes}
    (boxes, bands), _, mb = _timed_trace(lambda: node_exchange_plan(params, mesh, layout))
    out["exchange"] = {"s": _best_time(lambda: node_exchange_plan(params, mesh, layout)), "mb": mb,
                       "boxes": boxes, "bands": bands}
    worst = max(out["ranks"].values(), key=lambda v: (v["runs"], v["bytes"]))
    out["runs_s"] = max(v["runs_s"] for v in out["ranks"].values())
    out["runs_worst_rank"], out["runs_max"] = worst["rank"], worst["runs"]
    if commit:
        out.update(gather_free_commit(params, mesh, layout, fp))
    return out


# -- DCP coordinator path ------------------------------------------------------------------------
def local_save_plan(params: list[Param], mesh: Mesh, rank: int):
    """The SavePlan DCP's default planner makes on ``rank``: one WriteItem per DTensor chunk."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    items, mapping = [], {}
    for p, offsets, sizes in rank_chunks(params, mesh, rank, owned_only=False):
        off = torch.Size(offsets)
        items.append(WriteItem(
            index=MetadataIndex(p.name, off), type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=off, sizes=torch.Size(sizes)),
                                        properties=TensorProperties(dtype=torch.bfloat16),
                                        size=torch.Size(p.shape))))
        mapping[p.name] = (p.name,)
    return SavePlan(items, planner_data=mapping)


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
    out = {"items": sum(len(p.items) for p in plans), "build_s": time.perf_counter() - t0,
           "plan_bytes_rank0": len(pickle.dumps(plans[0], protocol=pickle.HIGHEST_PROTOCOL))}
    out["gather_plans_s"], out["gather_plans_bytes"] = unpickle_estimate(plans)
    if torch_planner:
        (final, metadata), out["torch_global_s"], out["torch_global_mb"] = _timed_rss(
            lambda: DefaultSavePlanner().create_global_plan(plans))
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
    rng, make = random.Random(0), _chunk_result_factory()
    results = [[WriteResult(index=it.index, size_in_bytes=math.prod(it.tensor_data.chunk.sizes) * 2,
                            storage_data=(make(it.index.fqn, math.prod(it.tensor_data.chunk.sizes) * 2,
                                               rng.getrandbits(32)),))  # the writer's per-item tuple
                for it in p.items] for p in ours]
    out["gather_results_s"], out["gather_results_bytes"] = unpickle_estimate(results)
    with no_file_io():
        _, out["finish_s"], out["finish_mb"] = _timed_then_traced(lambda: writer.finish(metadata, results))
    out["placements_ok"] = all(
        p.storage_data.placements.get(it.index.fqn) == (writer.layout.tensors[it.index.fqn].file,
                                                        writer.layout.tensors[it.index.fqn].offset)
        for p in ours for it in p.items)
    return out


# -- one case, and the sweep ---------------------------------------------------------------------
def run_case(model: str, n: int, *, tp: int = 8, dcp_max_items: int = 1_200_000, torch_max_items: int = 300_000,
             commit: bool = True, keep_layout: bool = False) -> dict:
    import torch  # noqa: F401  -- imported before any clock or tracemalloc starts
    import torch.distributed.checkpoint.default_planner  # noqa: F401

    import hf_storage  # noqa: F401

    gc.collect()
    gc.freeze()  # the imported modules: later (untimed) collections before each step skip them
    cfg, source = load_config(model)
    params = llama_params(cfg)
    mesh = mesh_for(n, tp)
    res = {"model": model, "config_source": source, "n": n, "dp": mesh.dp, "tp": mesh.tp, "tensors": len(params),
           "chunks": n * len(params), "gather_free": run_gather_free(params, mesh, commit=commit)}
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
            r["dcp_estimate"] = {key: ref["dcp"][key] * k for key in
                                 ("plan_s", "plan_mb", "finish_s", "finish_mb", "build_s", "gather_plans_s",
                                  "gather_plans_bytes", "gather_results_s") if key in ref["dcp"]}


def growth_exponent(rows: list[dict], path: str, key: str, min_chunks: int = 100_000) -> float | None:
    """Least-squares slope of log(key) against log(ranks x tensors) over the large rows; 1 = linear.

    Rows below ``min_chunks`` are left out: there fixed costs (milliseconds) hide the growth.
    """
    pts = [(math.log(r["chunks"]), math.log(r[path][key])) for r in rows
           if r.get(path) and r[path].get(key, 0) > 0.002 and r["chunks"] >= min_chunks]
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
    head1 = (f"{'model':<11} {'N':>5} {'mesh':>8} {'tensors':>7} {'chunks':>9} | {'plan s':>7} {'plan MB':>7} | "
             f"{'runs s':>7} {'runs':>8} {'rank':>5} | {'commit s':>8} {'commit MB':>9} {'reports MB':>10} | "
             f"{'node s':>7} {'node boxes':>10}")
    out = ["GATHER-FREE PATH (hf_storage.save): plan = layout.plan + fingerprint on every rank; runs = slowest of "
           "first/middle/last rank, runs and rank = the one with most runs; commit = rank 0 unpickles N reports + _commit_reports; "
           "node = row-assembly planning on one node (8 TP ranks' column boxes, exchange.plan_exchange)",
           head1, "-" * len(head1)]
    for r in rows:
        g = r["gather_free"]
        out.append(f"{r['model']:<11} {r['n']:>5} {str(r['dp']) + 'x' + str(r['tp']):>8} {r['tensors']:>7} "
                   f"{r['chunks']:>9} | {g['plan_s']:7.3f} {g['plan_mb']:7.1f} | {g['runs_s']:7.3f} "
                   f"{g['runs_max']:>8} {g['runs_worst_rank']:>5} | {_fmt(g.get('commit_s'), '8.2f')} "
                   f"{_fmt(g.get('commit_mb'), '9.1f')} {_fmt(g.get('report_bytes', 0) / 1e6, '10.1f')} | "
                   f"{_fmt(g.get('exchange', {}).get('s'), '7.3f')} {g.get('exchange', {}).get('boxes', '-'):>10}")
    head2 = (f"{'model':<11} {'N':>5} {'chunks':>9} | {'build s':>8} {'gather s':>8} {'gath MB':>8} | "
             f"{'torch glob s':>12} {'torch MB':>9} | {'ours plan s':>11} {'ours MB':>8} | {'finish s':>9} "
             f"{'finish MB':>9} {'res gath s':>10}")
    out += ["", "DCP COORDINATOR PATH: build = N local SavePlans (outside the clock; each rank builds its own); "
            "gather = coordinator unpickling the N plans (estimated from 16 ranks, a lower bound) and their size; "
            "torch glob = DefaultSavePlanner.create_global_plan (run up to --torch-max-items); "
            "ours = HuggingFaceStorageWriter.prepare_global_plan; finish = writer.finish over N x T WriteResults; "
            "res gath = unpickling those results (estimated); ~ = extrapolated linearly from the largest measured N",
            head2, "-" * len(head2)]
    for r in rows:
        d, est = r["dcp"], False
        if d is None:
            d, est = r.get("dcp_estimate") or {}, True
        gb = d.get("gather_plans_bytes")
        out.append(f"{r['model']:<11} {r['n']:>5} {r['chunks']:>9} | {_fmt(d.get('build_s'), '8.2f', est)} "
                   f"{_fmt(d.get('gather_plans_s'), '8.2f', est)} {_fmt(gb / 1e6 if gb else None, '8.0f', est)} | "
                   f"{_fmt(d.get('torch_global_s'), '12.2f', est)} {_fmt(d.get('torch_global_mb'), '9.0f', est)} | "
                   f"{_fmt(d.get('plan_s'), '11.2f', est)} {_fmt(d.get('plan_mb'), '8.0f', est)} | "
                   f"{_fmt(d.get('finish_s'), '9.2f', est)} {_fmt(d.get('finish_mb'), '9.0f', est)} "
                   f"{_fmt(d.get('gather_results_s'), '10.2f', est)}")
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
            checks.append({"check": what, "value": value, "limit": limit, "unit": unit, "note": note,
                           "target": target, "ok": value < limit})

    add(f"{name} gather-free plan (every rank)", g["plan_s"], TARGETS["plan_s"], "s")
    add(f"{name} gather-free plan memory", g["plan_mb"], TARGETS["plan_mb"], "MB")
    add(f"{name} per-rank run computation (worst rank)", g["runs_s"], TARGETS["runs_s"], "s")
    if "exchange" in g:
        add(f"{name} row-assembly planning on a node (every rank of it)", g["exchange"]["s"], TARGETS["runs_s"], "s")
    add(f"{name} gather-free commit on rank 0 (unpickle N reports + tally)", g.get("commit_s"), TARGETS["plan_s"], "s")
    add(f"{name} gather-free commit memory on rank 0", g.get("commit_mb"), TARGETS["plan_mb"], "MB", "RSS growth")
    d, note = big["dcp"], "measured"
    if d is None:
        d, note = big.get("dcp_estimate") or {}, "extrapolated linearly from the largest measured N"
    add(f"{name} DCP coordinator: ours prepare_global_plan", d.get("plan_s"), TARGETS["plan_s"], "s", note)
    add(f"{name} DCP coordinator: ours prepare_global_plan memory", d.get("plan_mb"), TARGETS["plan_mb"], "MB", note)
    add(f"{name} DCP coordinator: ours finish (tally of N x T results)", d.get("finish_s"), TARGETS["plan_s"], "s", note)
    add(f"{name} DCP coordinator: unpickling the N gathered plans (torch's gather, est.)", d.get("gather_plans_s"),
        TARGETS["plan_s"], "s", note + "; a lower bound", target=False)
    if "torch_global_s" in d:
        add(f"{name} DCP coordinator: torch create_global_plan (not ours)", d["torch_global_s"], TARGETS["plan_s"], "s",
            note, target=False)
    for path, key, ours in (("dcp", "plan_s", True), ("dcp", "finish_s", True), ("gather_free", "commit_s", True),
                            ("dcp", "torch_global_s", False)):
        e = growth_exponent(rows, path, key)
        add(f"growth of {path}.{key} with ranks x tensors (log-log slope; 1 = linear)", e, 1.15, "",
            "fit over measured rows with >= 100k chunks", target=ours)
    return checks


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(LLAMA_CONFIGS), choices=list(LLAMA_CONFIGS))
    p.add_argument("--ranks", type=int, nargs="+", default=list(DEFAULT_RANKS))
    p.add_argument("--tp", type=int, default=8, help="tensor-parallel degree (capped at N)")
    p.add_argument("--dcp-max-items", type=int, default=1_200_000,
                   help="skip (and extrapolate) the DCP path beyond this many write items (memory)")
    p.add_argument("--no-commit", action="store_true", help="skip the gather-free commit simulation")
    p.add_argument("--torch-max-items", type=int, default=300_000,
                   help="run torch's create_global_plan only up to this many write items (it grows superlinearly); "
                        "beyond, only its dedup step runs")
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
            kw = dict(tp=a.tp, dcp_max_items=a.dcp_max_items, torch_max_items=a.torch_max_items,
                      commit=not a.no_commit)
            r = run_case(model, n, **kw) if a.in_process else _in_child(run_case, model, n, **kw)
            g = r["gather_free"]
            print(f"{time.perf_counter() - t0:7.1f}s {model} N={n}: plan {g['plan_s']:.3f} s, runs {g['runs_s']:.3f} s"
                  + (f", commit {g['commit_s']:.2f} s" if "commit_s" in g else "")
                  + (f", DCP ours {r['dcp']['plan_s']:.2f} s / {r['dcp']['plan_mb']:.0f} MB" if r["dcp"] else ""),
                  flush=True)
            rows.append(r)
    _extrapolate(rows)
    checks = check_targets(rows)
    print("\n" + tables(rows) + "\n\nTARGETS")
    for c in checks:
        tag = ("met" if c["ok"] else "MISSED") if c["target"] else "info"
        print(f"  [{tag}] {c['check']}: {c['value']:.3g} {c['unit']} "
              f"(limit {c['limit']:g}{(' ' + c['unit']) if c['unit'] else ''}){'; ' + c['note'] if c['note'] else ''}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"argv": sys.argv[1:] if argv is None else list(argv), "rows": rows, "targets": checks,
            "wall_s": time.perf_counter() - t0}
    out.write_text(json.dumps(data, indent=1, default=str))
    print(f"\nwrote {out} ({data['wall_s']:.0f} s)")
    return data


if __name__ == "__main__":
    main()
