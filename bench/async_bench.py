"""Async checkpointing, side by side: how long a save stalls training, when it is committed, what memory it
keeps, and how much it slows a training step that runs while it writes.

    .venv/bin/python -m bench.async_bench                        # 2 ranks, 1 GB bf16, rows and columns, 3 reps
    .venv/bin/python -m bench.async_bench --async-gb 2 --reps 5 --layouts row
    .venv/bin/python -m bench.run --section async                # the same, as a section of ``make bench``

Contenders (every one on the same sharded llama-like state, 2 long-lived gloo ranks):
  * ``copy_ to host (floor)``: a plain ``copy_`` of every local shard into host memory allocated by the first
    call and reused: the least an async save can stall for;
  * ``hf_storage.save (sync)``; ``hf_storage.async_save`` with ``mode="thread"`` (the default) and
    ``mode="process"`` (skipped, with the reason, while ``async_save`` does not take ``mode``);
  * ``dcp.async_save`` with ``hf_storage.HuggingFaceStorageWriter``, with torch's own
    ``HuggingFaceStorageWriter(save_distributed=True, enable_consolidation=True)``, and with
    ``FileSystemWriter`` (DCP's native format: the speed reference, not HF). Their background collectives run
    on a dedicated gloo group; staging is torch's default (a fresh CPU copy per save).

Method
  * One untimed warm-up save of every contender on a tiny state; per layout, one untimed raw write of the
    state first (page-cache memory this VM never touched writes several times slower than recycled memory).
  * Memory: per contender, 5 saves in a row (each waits for the previous one to commit), the rank's memory
    sampled every 2 ms (:class:`TreePeak`: its anonymous and file RSS, the private RSS of its child processes,
    and half the node's shared-memory growth, which both ranks map), no ``malloc_trim`` in between. ``RSS 1st`` =
    peak during save 1 - RSS before it; ``RSS 5`` = peak over the 5 saves - RSS before save 1; ``2->5`` =
    peak during save 5 - peak during save 2 (creep). Max over ranks.
  * Timing, ``--reps`` repetitions, contenders alternating in rotated order. ``stall``: how long the call
    blocks; ``committed``: call start -> future resolved (files and index complete), with the caller idle
    (waiting on the future). Every async contender then saves again while the caller runs a fixed CPU
    "training step" (``torch.mm`` of 384 x 384 fp32, 4 per step, 1 thread per rank) until the future
    resolves: ``slowdown`` = mean step time during that write / mean step time just before, idle;
    ``busy commit`` = its committed time. Slowest rank for times, worst rank for slowdown; medians with
    (min-max) over the repetitions.

Output: the tables on stdout, ``RESULTS/async.json`` (or the ``"async"`` entry of ``bench.json`` under
``bench.run``) with every run of every rank.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

from . import run as R
from .rss import RssPeak

WORLD = 2
LAYOUTS = ("row", "col")
FLOOR = "copy_ to host (floor)"
SYNC = "hf_storage.save (sync)"
THREAD = "hf_storage.async_save thread"
PROCESS = "hf_storage.async_save process"
DCP_OURS = "dcp.async_save + hf_storage writer"
DCP_TORCH_HF = "dcp.async_save + torch HF writer"
DCP_FS = "dcp.async_save + FileSystemWriter"
ASYNC = (THREAD, PROCESS, DCP_OURS, DCP_TORCH_HF, DCP_FS)
NAMES = (FLOOR, SYNC, *ASYNC)
OURS_ASYNC = (THREAD, PROCESS)
STEP_N, STEP_MM = 384, 4  # the "training step": STEP_MM products of STEP_N x STEP_N fp32 matrices


@dataclass
class AsyncSettings:
    gb: float = 1.0
    reps: int = 3
    series: int = 5
    idle_s: float = 0.5
    threads: int = 4
    max_shard_size: str | None = "5GB"
    checksums: bool | None = None
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    names: list[str] = field(default_factory=lambda: list(NAMES))
    scratch: str = ""


# -- measurement (inside the workers) ---------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_descendants(kid)]
    return out


def _private_rss(pid: int) -> int:
    """Resident bytes of ``pid`` less its shared ones (file pages, shared memory: the host copies a writer
    process maps are counted once, in the rank that made them)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _status_kb(fd: int, keys: tuple[bytes, ...]) -> int:
    """The sum of ``keys`` (kB lines) of a ``/proc`` status-like file open at ``fd``."""
    total = 0
    for line in os.pread(fd, 8192, 0).splitlines():
        if line.startswith(keys):
            total += int(line.split()[1])
    return total


class TreePeak(RssPeak):
    """The memory a rank is answerable for: its resident pages less shared memory, the private pages of its
    descendants (a process-mode save writes in a child), and its share (1 / ranks on the node) of the node's
    shared memory (``Shmem`` of ``/proc/meminfo``: host copies a writer process maps, row-assembly slots, staged
    rows; every rank of the node touches those pages, so its own RSS would count them once per rank). With
    windows: :meth:`window` restarts the peak, :meth:`take` reads it."""

    def __init__(self, period: float = 0.002, ranks: int = WORLD):
        super().__init__(period)
        self._lock = threading.Lock()
        self._pids: list[int] = []
        self._ticks = 0
        self._ranks = ranks
        self._status = os.open("/proc/self/status", os.O_RDONLY)
        self._meminfo = os.open("/proc/meminfo", os.O_RDONLY)

    def rss(self) -> int:
        self._ticks += 1
        if self._ticks % 25 == 1:  # look for new children every ~50 ms
            self._pids = _descendants(os.getpid())
        own = _status_kb(self._status, (b"RssAnon:", b"RssFile:"))
        node_shared = _status_kb(self._meminfo, (b"Shmem:",)) // self._ranks
        return (own + node_shared) * 1024 + sum(_private_rss(p) for p in self._pids)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        os.close(self._status)
        os.close(self._meminfo)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            now = self.rss()
            with self._lock:
                self.peak = max(self.peak, now)

    def window(self) -> None:
        now = self.rss()
        with self._lock:
            self.peak = now

    def take(self) -> int:
        now = self.rss()
        with self._lock:
            self.peak = max(self.peak, now)
            return self.peak


class Trainer:
    """A fixed CPU "training step" on the calling thread."""

    def __init__(self) -> None:
        import torch

        gen = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(STEP_N, STEP_N, generator=gen) / STEP_N for _ in range(2))
        self.c = torch.empty(STEP_N, STEP_N)

    def step(self) -> float:
        import torch

        t0 = time.perf_counter()
        for _ in range(STEP_MM):
            torch.mm(self.a, self.b, out=self.c)
        return time.perf_counter() - t0

    def idle(self, seconds: float) -> float:
        """Mean step time over ``seconds`` with nothing else running on this rank (at least 3 steps)."""
        steps: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(steps) < 3:
            steps.append(self.step())
        return statistics.fmean(steps)

    def until(self, future) -> list[float]:
        steps = []
        while not future.done():
            steps.append(self.step())
        return steps


@dataclass
class Env:
    """What a contender needs on this rank: the bench options, DCP's gloo group, the floor's host buffers."""

    o: object  # bench.contenders.Opts
    group: object  # a gloo ProcessGroup for dcp.async_save's background collectives
    trainer: Trainer
    host: list = field(default_factory=list)
    copies: dict = field(default_factory=dict)  # mode -> hf_storage's host copies for that mode
    skipped: dict[str, str] = field(default_factory=dict)

    def use_copies(self, mode: str | None) -> None:
        """Give ``hf_storage.async_save`` the host copies of ``mode`` (None: drop them all). The library keeps
        one set per process, keyed by mode and shapes, so alternating thread and process saves would reallocate
        them at every save; a training job uses one mode, and this keeps each mode's copies warm as it would."""
        from hf_storage import background

        saver = getattr(background, "_SAVER", None)
        if saver is None or not hasattr(saver, "copies"):
            return
        if mode is None:
            self.copies.clear()
            saver.copies = type(saver.copies)()
            return
        if mode not in self.copies:
            self.copies[mode] = type(saver.copies)()
        saver.copies = self.copies[mode]


def _copy_to_host(state, path, env: Env):
    import torch

    locals_ = [t.to_local() for t in state.values()]
    if [tuple(b.shape) for b in env.host] != [tuple(t.shape) for t in locals_]:
        env.host = []
        env.host = [torch.empty_like(t) for t in locals_]
    for buf, t in zip(env.host, locals_):
        buf.copy_(t)


def _contenders() -> dict:
    """name -> ``fn(state, path, env)``: None once the save is complete, else a future of it."""
    import torch.distributed.checkpoint as dcp

    import hf_storage

    from . import contenders as C

    def sync(state, path, env):
        C.save_hf(state, path, env.o)

    def thread(state, path, env):
        env.use_copies("thread")
        return hf_storage.async_save(state, path, **C._ours(env.o))

    def process(state, path, env):
        env.use_copies("process")
        return hf_storage.async_save(state, path, mode="process", **C._ours(env.o))

    def dcp_ours(state, path, env):
        writer = hf_storage.HuggingFaceStorageWriter(path, **C._ours(env.o))
        return dcp.async_save(state, storage_writer=writer, process_group=env.group)

    def dcp_torch_hf(state, path, env):
        t = env.o.threads
        writer = dcp.HuggingFaceStorageWriter(
            path, thread_count=t, save_distributed=True, enable_consolidation=True, thread_count_consolidation=t
        )
        writer.sync_files = env.o.durable  # as bench.run: no fsync in the non-durable rows
        return dcp.async_save(state, storage_writer=writer, process_group=env.group)

    def dcp_fs(state, path, env):
        writer = dcp.FileSystemWriter(path, thread_count=env.o.threads, sync_files=env.o.durable)
        return dcp.async_save(state, storage_writer=writer, process_group=env.group)

    fns = (_copy_to_host, sync, thread, process, dcp_ours, dcp_torch_hf, dcp_fs)
    return dict(zip(NAMES, fns, strict=True))


def _gather(values: list) -> list[list[float | None]]:
    """Every rank's ``values`` (None travels as NaN and comes back as None)."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [[None if math.isnan(x) else x for x in t.tolist()] for t in every]


def _save_once(fn, state, path: str, env: Env, busy: bool = False, trim: bool = True) -> list:
    """One save on this rank: [stall s, committed s, mean training step during the write s, steps, the seconds
    our background part reports (``SaveSummary.seconds``; None for the others)]."""
    import torch.distributed as dist

    if trim:
        R._trim()
    dist.barrier()
    t0 = time.perf_counter()
    future = fn(state, path, env)
    stall = time.perf_counter() - t0
    if future is None:
        return [stall, stall, None, 0, None]
    done: list[float] = []
    future.add_done_callback(lambda _f: done.append(time.perf_counter()))
    steps = env.trainer.until(future) if busy else []
    inner = getattr(future.result(), "seconds", None)
    resolved = time.perf_counter()
    committed = min(done[0], resolved) if done else resolved
    return [stall, committed - t0, statistics.fmean(steps) if steps else None, len(steps), inner]


def _record(every: list[list]) -> dict:
    """One run over all ranks: slowest stall and commit, worst slowdown; ``ranks`` keeps every rank's figures."""
    out = {
        "stall_s": max(v[0] for v in every),
        "committed_s": max(v[1] for v in every),
        "ranks": every,
    }
    inner = [v[4] for v in every if v[4] is not None]
    out["writer_s"] = max(inner) if inner else None
    if len(every[0]) > 5:  # a busy run: [.., mean step during the write, steps, writer s, mean idle step]
        slow = [v[2] / v[5] for v in every if v[2] is not None and v[5]]
        out["slowdown"] = max(slow) if slow else None
        out["steps"] = min(int(v[3]) for v in every)
    return out


# -- one layout ------------------------------------------------------------------------------------------
def _series(fn, state, env: Env, s: AsyncSettings, counter) -> dict:
    """``s.series`` saves in a row with the RSS of the rank (and its children) sampled throughout."""
    rank = env.o.rank
    _drop_staged_rows()
    _gather([None])  # every rank has dropped them before any rank measures
    R._trim()
    runs, peaks, kept = [], [], []
    with TreePeak() as mem:
        for _ in range(s.series):
            path = os.path.join(s.scratch, f"async-{next(counter)}")
            mem.window()
            vals = _save_once(fn, state, path, env, trim=False)
            peaks.append(mem.take() - mem.base)
            kept.append(mem.rss() - mem.base)
            R._cleanup(path, rank)
            runs.append(_record(_gather(vals)))
    every = _gather([peaks[0], max(peaks), peaks[-1] - peaks[min(1, len(peaks) - 1)], kept[0], kept[-1]])
    mb = [max(v[i] for v in every) / 1e6 for i in range(5)]
    return {
        "runs": runs,
        "rss_first_mb": mb[0],
        "rss_all_mb": mb[1],
        "creep_mb": mb[2],
        "kept_first_mb": mb[3],
        "kept_last_mb": mb[4],
        "peaks_mb": [[p / 1e6 for p in v] for v in _gather(peaks)],
    }


def _drop_staged_rows() -> None:
    """The rows an async save stages column shards into are kept for the next save, whatever its mode: each
    contender's series starts without them, so that it counts them as a job using it alone would."""
    from hf_storage import row_assembly

    row_assembly.release()


def _rep(fns: dict, names: list[str], state, env: Env, s: AsyncSettings, counter, rep: int) -> dict:
    """One repetition: every contender once with the caller idle, the async ones again while it trains."""
    out = {}
    for name in R._rotated(names, rep):
        path = os.path.join(s.scratch, f"async-{next(counter)}")
        quiet = _record(_gather(_save_once(fns[name], state, path, env)))
        R._cleanup(path, env.o.rank)
        busy = None
        if name in ASYNC:
            idle = env.trainer.idle(s.idle_s)
            path = os.path.join(s.scratch, f"async-{next(counter)}")
            busy = _record(_gather([*_save_once(fns[name], state, path, env, busy=True), idle]))
            R._cleanup(path, env.o.rank)
        out[name] = {"quiet": quiet, "busy": busy}
        R._say(env.o.rank, _line(f"rep {rep}", name, quiet, busy))
    return out


def _line(tag: str, name: str, quiet: dict, busy: dict | None) -> str:
    text = f"  [{tag}] {name:<36} stall {quiet['stall_s']:7.3f} s  committed {quiet['committed_s']:7.3f} s"
    if busy is not None:
        slow = busy.get("slowdown")
        text += f"  busy: committed {busy['committed_s']:7.3f} s slowdown {slow or float('nan'):5.2f}x"
    return text


def _run_layout(layout: str, fns: dict, env: Env, s: AsyncSettings, counter) -> dict:
    from . import contenders as C
    from .models import llama_like

    names = [n for n in s.names if n not in env.skipped]
    cfg = llama_like(int(s.gb * 1e9))
    state = C.llama_state(cfg, layout, C.mesh_for(layout, env.o.world))
    R._settle()
    local = max(v[0] for v in _gather([C.local_bytes(state)]))
    res = {"layout": layout, "bytes": C.total_bytes(state), "local_bytes": local, "config": cfg, "series": {}}
    R._say(env.o.rank, f"async {layout}: {res['bytes'] / 1e9:.3f} GB, {len(state)} tensors, local {local / 1e9:.3f} GB")
    prime = os.path.join(s.scratch, f"prime-{next(counter)}")
    C.save_raw(state, prime, env.o)
    R._cleanup(prime, env.o.rank)
    for name in names:
        res["series"][name] = _series(fns[name], state, env, s, counter)
        sr = res["series"][name]
        R._say(
            env.o.rank,
            f"  [series] {name:<36} RSS 1st {sr['rss_first_mb']:8.1f} MB  {s.series} saves "
            f"{sr['rss_all_mb']:8.1f} MB  2->{s.series} {sr['creep_mb']:6.1f} MB",
        )
    res["reps"] = [_rep(fns, names, state, env, s, counter, rep) for rep in range(s.reps)]
    env.host = []
    env.use_copies(None)
    del state
    gc.unfreeze()
    R._settle()
    return res


# -- the workers -----------------------------------------------------------------------------------------
def _warm_up(fns: dict, env: Env, s: AsyncSettings) -> None:
    """One untimed save of every contender on a tiny state; a contender that raises TypeError (an option this
    version lacks, e.g. ``mode="process"``) is skipped, with the reason, on every rank."""
    import itertools

    from . import contenders as C

    tiny = dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        vocab_size=256,
    )
    state = C.llama_state(tiny, "row", C.mesh_for("row", env.o.world))
    counter = itertools.count(10**6)
    for name in s.names:
        path = os.path.join(s.scratch, f"warm-{next(counter)}")
        try:
            _save_once(fns[name], state, path, env)
            failed = 0.0
        except TypeError as e:
            env.skipped[name] = f"TypeError: {e}"
            failed = 1.0
        if any(v[0] for v in _gather([failed])) and name not in env.skipped:
            env.skipped[name] = "TypeError on another rank"
        R._cleanup(path, env.o.rank)
        R._say(env.o.rank, f"async warm-up: {name}" + (f" skipped: {env.skipped[name]}" if name in env.skipped else ""))


def _run_all(rank: int, world: int, s: AsyncSettings) -> dict:
    import itertools

    import torch.distributed as dist

    from .contenders import Opts

    o = Opts(rank, world, s.threads, False, s.max_shard_size, s.checksums)
    env = Env(o, dist.new_group(backend="gloo"), Trainer())
    fns = _contenders()
    _warm_up(fns, env, s)
    for name, why in env.skipped.items():
        R._say(rank, f"async: skipping {name}: {why}")
    R._settle()
    counter = itertools.count()
    layouts = [_run_layout(layout, fns, env, s, counter) for layout in s.layouts]
    return {"layouts": layouts, "skipped": env.skipped}


def _worker(rank: int, world: int, port: int, s: AsyncSettings, _many: bool, queue) -> None:
    R.serve_rank(rank, world, port, queue, lambda r, w: _run_all(r, w, s))


def run_section(s: AsyncSettings, timeout: float = 3600) -> dict:
    """Run the async section in its own pool of ``WORLD`` gloo ranks; the raw results of rank 0's view."""
    started = time.perf_counter()
    res = R.run_world(WORLD, s, False, timeout, worker=_worker)
    res["settings"] = asdict(s)
    res["world"] = WORLD
    res["step"] = {"n": STEP_N, "mm_per_step": STEP_MM, "dtype": "float32", "threads_per_rank": 1}
    res["wall_s"] = time.perf_counter() - started
    return res


def fmt(v: dict | None, digits: int = 3) -> str:
    return R.fmt_spread(v, digits)


# -- summary and tables (parent process, no torch) --------------------------------------------------------
def summarize(layout: dict) -> dict:
    out = {}
    for name, series in layout["series"].items():
        runs = [r[name] for r in layout["reps"] if name in r]
        busy = [r["busy"] for r in runs if r["busy"]]
        out[name] = {
            "stall_s": R.spread([r["quiet"]["stall_s"] for r in runs]),
            "committed_s": R.spread([r["quiet"]["committed_s"] for r in runs]) if name != FLOOR else None,
            "busy_committed_s": R.spread([r["committed_s"] for r in busy]),
            "slowdown": R.spread([r.get("slowdown") for r in busy]),
            **{k: series[k] for k in ("rss_first_mb", "rss_all_mb", "creep_mb", "kept_first_mb", "kept_last_mb")},
        }
    return out


def _med(summ: dict, name: str, key: str) -> float | None:
    v = summ.get(name, {}).get(key)
    return v["median"] if v else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(layout: dict, summ: dict) -> dict:
    """The issue's targets, for each of our async modes that ran: (value, target, 'le' | 'ge')."""
    out: dict = {}
    for ours in OURS_ASYNC:
        if ours not in summ:
            continue
        stall, committed = _med(summ, ours, "stall_s"), _med(summ, ours, "committed_s")
        budget = layout["local_bytes"] / 1e6 + 100
        out[ours] = {
            "stall / copy_": (_div(stall, _med(summ, FLOOR, "stall_s")), 1.3, "le"),
            "stall / dcp+torch-HF stall": (_div(stall, _med(summ, DCP_TORCH_HF, "stall_s")), 1.0, "le"),
            "committed / ours sync": (_div(committed, _med(summ, SYNC, "committed_s")), 1.2, "le"),
            "dcp+torch-HF committed / ours": (_div(_med(summ, DCP_TORCH_HF, "committed_s"), committed), 4.0, "ge"),
            "RSS 5 saves / (local + 100 MB)": (_div(summ[ours]["rss_all_mb"], budget), 1.0, "le"),
            "RSS creep save 2->5, MB": (summ[ours]["creep_mb"], 10.0, "le"),
        }
    return out


def _table(data: dict) -> list[str]:
    n = data["settings"]["series"]
    head = (
        f"{'layout':<6} {'contender':<36} {'stall s':>21} {'committed s':>21} {'busy commit s':>21} "
        f"{'slowdown x':>18} {'RSS 1st':>8} {f'RSS {n}':>8} {f'2->{n}':>6}"
    )
    lines = [head, "-" * len(head)]
    for lay in data["layouts"]:
        for i, (name, v) in enumerate(lay["summary"].items()):
            lines.append(
                f"{lay['layout'] if i == 0 else '':<6} {name:<36} {fmt(v['stall_s']):>21} "
                f"{fmt(v['committed_s']):>21} {fmt(v['busy_committed_s']):>21} {fmt(v['slowdown'], 2):>18} "
                f"{v['rss_first_mb']:8.1f} {v['rss_all_mb']:8.1f} {v['creep_mb']:6.1f}"
            )
    return lines


def _targets(data: dict) -> list[str]:
    lines = [f"{'layout':<6} {'ours':<30} {'figure':<32} {'value':>8} {'target':>8}  ok"]
    for lay in data["layouts"]:
        for ours, figures in lay["ratios"].items():
            for figure, (value, target, how) in figures.items():
                ok = value is not None and (value <= target if how == "le" else value >= target)
                shown = "-" if value is None else f"{value:8.2f}"
                sign = "<=" if how == "le" else ">="
                lines.append(
                    f"{lay['layout']:<6} {ours:<30} {figure:<32} {shown:>8} {sign}{target:6.1f}  "
                    f"{'-' if value is None else 'yes' if ok else 'NO'}"
                )
    return lines


def report(data: dict) -> str:
    """The async tables; fills in ``summary`` and ``ratios`` of every layout."""
    for lay in data["layouts"]:
        lay["summary"] = summarize(lay)
        lay["ratios"] = ratios(lay, lay["summary"])
    s = data["settings"]
    gb = data["layouts"][0]["bytes"] / 1e9 if data["layouts"] else s["gb"]
    title = (
        f"ASYNC ({data['world']} ranks, {gb:.2f} GB bf16; median (min-max) of {s['reps']} reps; stall = call "
        f"blocks; committed = call -> future resolved, caller idle; busy = caller runs a {STEP_N}^2 matmul step "
        f"meanwhile, slowdown = step time vs idle; RSS MB (rank + children): peak growth in save 1, over "
        f"{s['series']} saves, creep save 2->{s['series']})"
    )
    parts = [title, *_table(data)]
    for name, why in data.get("skipped", {}).items():
        parts.append(f"skipped {name}: {why}")
    parts += ["", "ASYNC TARGETS (medians; the issue's targets)", *_targets(data)]
    return "\n".join(parts)


# -- command line ----------------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    """The async section's own options (shared with ``bench.run``)."""
    p.add_argument("--async-gb", type=float, help="GB of bf16 state in the async section (default 1; --quick 0.064)")
    p.add_argument("--async-series", type=int, default=5, help="saves in a row for the memory figures (default 5)")
    p.add_argument("--async-idle", type=float, default=0.5, help="seconds of idle training steps before each busy run")


def settings_from(a, scratch: str) -> AsyncSettings:
    """AsyncSettings from ``bench.run``'s (or this module's) parsed arguments."""
    gb = a.async_gb if a.async_gb is not None else (0.064 if a.quick else 1.0)
    names = [n for n in NAMES if n == FLOOR or not a.contenders or n in a.contenders]
    checksums = {"default": None, "on": True, "off": False}[getattr(a, "checksums", "default")]
    return AsyncSettings(
        gb=gb,
        reps=a.reps,
        series=max(2, a.async_series),
        idle_s=a.async_idle,
        threads=a.threads,
        max_shard_size=None if str(a.max_shard_size).lower() == "none" else a.max_shard_size,
        checksums=checksums,
        layouts=[x for x in a.layouts if x in LAYOUTS],
        names=names,
        scratch=scratch,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.async_bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="0.064 GB, 1 repetition (smoke test)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--threads", type=int, default=4, help="thread_count given to every writer that takes one")
    p.add_argument("--max-shard-size", default="5GB", help="file size policy for our writers ('none' = one file)")
    p.add_argument("--contenders", nargs="+", help=f"only these (the floor always runs): {', '.join(NAMES)}")
    p.add_argument("--scratch", help="directory for checkpoint files (default: a fresh one under /tmp)")
    p.add_argument("--out", default=str(R.RESULTS), help="results directory (async.json, async.txt)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before the workers are killed")
    add_args(p)
    a = p.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    return a


def main(argv=None) -> dict:
    return R.run_standalone("async", parse_args(argv), run_section, settings_from, report)


if __name__ == "__main__":
    main()
