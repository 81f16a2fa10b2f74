"""Side-by-side speed and memory benchmark of checkpoint save/load (issue 4), plus 50,000 tiny tensors (issue 6).

    make bench                                   # the full default run (~10 min on 2 cores)
    .venv/bin/python -m bench.run --quick        # smoke test: small sizes, 1 repetition
    .venv/bin/python -m bench.run --world-sizes 2 --layouts row --sizes 0.5 1 --reps 5
    .venv/bin/python -m bench.run --section many-tensors
    .venv/bin/python -m bench.run --section async         # async checkpointing only (bench/async_bench.py)
    .venv/bin/python -m bench.run --section objstore      # saving to an S3 store (bench/objstore_bench.py)

Method
  * One pool of gloo worker processes per world size is spawned once; every contender runs inside it,
    so process start-up and imports are outside the timings (one untimed warm-up of every contender first).
  * Repetitions alternate the contenders, rotating their order each repetition; the table reports the
    median. Each case starts with one untimed raw write of its state (the first large write after
    allocating it is often several times slower here, and would land on whichever contender runs first).
    A barrier precedes each run; a run's time is the slowest rank's; output goes to a fresh
    directory that is deleted (and the page cache synced) after the run, outside the clock.
  * Save rows without fsync measure writing into the page cache, as the raw bound does. The durable rows
    fsync (ours: ``durable=True``; torch: ``sync_files=True``); the bound there is write + fsync.
  * Loads read a checkpoint written once by ``hf_storage.save``. With root and a writable
    ``/proc/sys/vm/drop_caches`` the page cache is dropped before every load run (cold reads; the JSON
    says ``"cache": "cold"``); otherwise, or with ``--warm``, reads are warm-cache. Every load is
    checked against the saved values after the clock stops.
  * CPU: user + system seconds of every rank's process (all threads), summed over ranks -- less sensitive
    than wall time to other load on the machine.
  * Memory: each rank samples its RSS (``/proc/self/statm``) every 2 ms in a thread; the figure is the
    peak minus a baseline taken just before the operation (after ``gc.collect`` and ``malloc_trim``),
    maximum over ranks and repetitions. Load targets are allocated and touched before the baseline, so
    load growth is what the reader needs beyond the target itself.
  * Contenders get the same ``--threads`` (default 4) wherever they take a thread count. The load table
    also has ``bulk pread + copy (ref)``: whole rows in large reads then a strided copy, a reference for
    what coalescing column-shard runs could reach (it can beat the per-run "bound").
  * Long-lived objects are frozen out of the garbage collector (``gc.freeze``) after each setup so that the
    untimed ``gc.collect`` before every run stays cheap.

Default matrix (chosen to finish in about 12 minutes on this 2-core machine when it is otherwise idle)
  * 2 ranks: row shards (FSDP, Shard(0)) at every ``--sizes`` (0.5, 1, 2 GB) -- how cost grows with bytes;
    column shards (TP, Shard(1)) at ``--size`` (0.5 GB); a durable save of row shards at ``--durable-size``
    (0.5 GB, save only);
  * 4 ranks: row, column and 2-D ([Shard(0), Shard(1)] on a 2 x 2 mesh) at ``--size`` (0.5 GB), so every
    layout and world size compares at the same 0.5 GB;
  * 2 ranks: 50,000 fp32 8x8 DTensors, save and load (``--many-count``), ``--many-reps`` (1) repetitions;
  * 2 ranks: async checkpointing (``bench/async_bench.py``; about 6 more minutes): stall, time to commit, RSS
    over 5 saves in a row and the slowdown of a training step, rows and columns at ``--async-gb`` (1 GB);
  * 2 ranks: saving to an object store (``bench/objstore_bench.py``; a local moto S3 server over HTTP; about 8
    more minutes): ``hf_storage.save`` to ``s3://`` against save-then-upload and a raw upload bound, rows and
    columns at ``--objstore-gb`` (1 GB);
  * ``--reps`` (3) repetitions, but the two slow contenders (torch's consolidating HF writer and gather +
    save_file, 5-20x slower than the rest) run ``--slow-reps`` (1) times: their median is of one run.
  ``--cross`` runs every size for every layout and world size instead. ``--profile CONTENDER`` writes a
  cProfile of that contender on rank 0 (``bench/results/profile-*.prof``) and prints its top functions.

Output: tables on stdout, ``bench/results/bench.json`` (every number), ``bench/results/bench.png``; a
full (non ``--quick``) run into the default results directory also copies the plot to ``docs/bench.png``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import names as N
from .rss import RssPeak

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DROP_CACHES = "/proc/sys/vm/drop_caches"


@dataclass(frozen=True)
class Case:
    world: int
    layout: str
    size_gb: float
    durable: bool = False

    @property
    def label(self) -> str:
        return f"{self.layout} W={self.world} {self.size_gb:g}GB" + (" durable" if self.durable else "")


@dataclass
class Settings:
    reps: int
    threads: int
    max_shard_size: str | None
    cold: bool
    scratch: str
    save_names: list[str]
    load_names: list[str]
    many_count: int = 0
    many_reps: int = 1
    slow_reps: int = 1
    checksums: bool | None = None
    warm_up: bool = True
    profile: list[str] = field(default_factory=list)
    out_dir: str = str(RESULTS)
    cases: list[Case] = field(default_factory=list)


# -- measurement helpers (run inside the workers) -----------------------------------------------
def _trim() -> None:
    gc.collect()  # cheap: long-lived objects are frozen (see _settle)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _settle() -> None:
    """Collect, then freeze what lives on (modules, the state dicts) so that later collections skip it."""
    gc.collect()
    gc.freeze()


def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def _drop_caches(rank: int) -> None:
    import torch.distributed as dist

    if rank == 0:
        os.sync()
        with open(DROP_CACHES, "w") as f:
            f.write("1")
    dist.barrier()


def timed(fn, profile: str | None = None) -> dict:
    """Run ``fn`` on every rank after a barrier: the slowest rank's seconds, the CPU seconds of all ranks
    (user + system, every thread: robust to a busy machine) and every rank's RSS growth."""
    import torch
    import torch.distributed as dist

    _trim()
    dist.barrier()
    with RssPeak() as mem:
        c0, t0 = _cpu(), time.perf_counter()
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.runcall(fn)
        else:
            fn()
        dt, cpu = time.perf_counter() - t0, _cpu() - c0
    if profile:
        prof.dump_stats(profile)
    mine = torch.tensor([dt, mem.growth, cpu], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return {
        "s": max(float(v[0]) for v in every),
        "mem_mb": [float(v[1]) / 1e6 for v in every],
        "cpu_s": sum(float(v[2]) for v in every),
    }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cleanup(path: str, rank: int) -> None:
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()
    dist.barrier()


def _rotated(names: list[str], rep: int) -> list[str]:
    k = rep % len(names)
    return names[k:] + names[:k]


_T0 = time.perf_counter()


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"{time.perf_counter() - _T0:7.1f}s {msg}", flush=True)


def _check_equal(target: dict, source: dict, who: str) -> None:
    import torch

    def bits(t):  # bitwise: random bf16 bit patterns include NaNs
        return t.to_local().contiguous().view(torch.uint8)

    bad = [k for k in source if not torch.equal(bits(target[k]), bits(source[k]))]
    if bad:
        raise AssertionError(f"{who} loaded wrong values for {len(bad)} tensors, e.g. {bad[:3]}")


def _zero(state: dict) -> None:
    for t in state.values():
        t.to_local().zero_()


# -- one world size: every case, inside long-lived workers ----------------------------------------
def _schedule(names: list[str], reps: int, slow_reps: int | None):
    """(rep, name) in run order: contenders alternate, their order rotating; slow ones stop after slow_reps."""
    for rep in range(reps):
        for name in _rotated(names, rep):
            if slow_reps is None or name not in N.SLOW or rep < slow_reps:
                yield rep, name


def _profile_path(s: Settings, o, kind: str, name: str, tag: str, rep: int) -> str | None:
    if o.rank != 0 or name not in s.profile:
        return None
    slug = "".join(ch if ch.isalnum() else "-" for ch in f"{kind}-{name}-{tag}-{rep}").strip("-")
    os.makedirs(s.out_dir, exist_ok=True)
    return os.path.join(s.out_dir, f"profile-{slug}.prof")


def _save_runs(
    state, names, o, s: Settings, counter, tag: str, reps: int, say: bool = True, slow_reps: int | None = None
) -> dict:
    from . import contenders as C

    out: dict[str, list] = {n: [] for n in names}
    # One untimed write of the state first: the first large write after allocating a case's state is often
    # several times slower on this VM (page-cache growth), and would otherwise land on whoever runs first.
    prime = os.path.join(s.scratch, f"prime-{next(counter)}")
    C.save_raw(state, prime, o)
    _cleanup(prime, o.rank)
    for rep, name in _schedule(names, reps, slow_reps):
        path = os.path.join(s.scratch, f"save-{next(counter)}")
        r = timed(functools.partial(C.SAVE[name], state, path, o), _profile_path(s, o, "save", name, tag, rep))
        _cleanup(path, o.rank)
        out[name].append(r)
        _say(o.rank if say else -1, f"  [{tag}] save {name:<30} {r['s']:8.3f} s  mem {max(r['mem_mb']):8.1f} MB")
    return out


def _load_runs(
    state, target, names, o, s: Settings, tag: str, reps: int, say: bool = True, slow_reps: int | None = None
) -> dict:
    from . import contenders as C

    ckpt = os.path.join(s.scratch, "ckpt")
    C.save_hf(state, ckpt, o)
    _cleanup(os.path.join(s.scratch, "none"), o.rank)  # barrier + sync: the checkpoint is on disk
    where = C.raw_load_plan(ckpt)
    fns = {n: functools.partial(C.LOAD[n], target, ckpt, o, *((where,) if n in N.NEEDS_WHERE else ())) for n in names}
    out: dict[str, list] = {n: [] for n in names}
    for rep, name in _schedule(names, reps, slow_reps):
        _zero(target)
        if s.cold:
            _drop_caches(o.rank)
        r = timed(fns[name], _profile_path(s, o, "load", name, tag, rep))
        _check_equal(target, state, name)
        out[name].append(r)
        _say(o.rank if say else -1, f"  [{tag}] load {name:<30} {r['s']:8.3f} s  mem {max(r['mem_mb']):8.1f} MB")
    _cleanup(ckpt, o.rank)
    return out


def _run_case(case: Case, o, s: Settings, counter) -> dict:
    from . import contenders as C
    from .models import llama_like

    mesh = C.mesh_for(case.layout, case.world)
    cfg = llama_like(int(case.size_gb * 1e9))
    state = C.llama_state(cfg, case.layout, mesh)
    _settle()
    res = {
        **asdict(case),
        "label": case.label,
        "bytes": C.total_bytes(state),
        "config": cfg,
        "local_bytes": C.local_bytes(state),
        "save": {},
        "load": {},
    }
    _say(
        o.rank,
        f"{case.label}: {res['bytes'] / 1e9:.3f} GB, {len(state)} tensors, "
        f"{cfg['num_hidden_layers']} layers of hidden {cfg['hidden_size']}",
    )
    names = [n for n in (N.DURABLE_SAVE if case.durable else N.SAVE) if n in s.save_names]
    res["save"] = _save_runs(state, names, o, s, counter, case.label, s.reps, slow_reps=s.slow_reps)
    if not case.durable and s.load_names:
        target = C.llama_state(cfg, case.layout, mesh, zeros=True)
        _settle()
        res["load"] = _load_runs(state, target, s.load_names, o, s, case.label, s.reps, slow_reps=s.slow_reps)
        del target
    del state
    gc.unfreeze()
    _settle()
    return res


def _run_many(o, s: Settings, counter) -> dict:
    from . import contenders as C

    mesh = C.mesh_for("row", o.world)
    state = C.many_tensor_state(s.many_count, mesh)
    _settle()
    tag = f"many {s.many_count} W={o.world}"
    res = {"world": o.world, "count": s.many_count, "bytes": C.total_bytes(state), "save": {}, "load": {}}
    res["save"] = _save_runs(state, [n for n in N.MANY_SAVE if n in s.save_names], o, s, counter, tag, s.many_reps)
    target = C.many_tensor_state(s.many_count, mesh, zeros=True)
    _settle()
    res["load"] = _load_runs(state, target, [n for n in N.MANY_LOAD if n in s.load_names], o, s, tag, s.many_reps)
    return res


def _warm_up(o, s: Settings) -> None:
    """One untimed run of every contender on a tiny state: imports and first-call costs stay out."""
    import itertools

    from . import contenders as C

    mesh = C.mesh_for("row", o.world)
    tiny = {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "vocab_size": 256,
    }
    state = C.llama_state(tiny, "row", mesh)
    _save_runs(state, s.save_names, o, s, itertools.count(10**6), "warm-up", 1, say=False)
    target = C.llama_state(tiny, "row", mesh, zeros=True)
    _load_runs(state, target, s.load_names, o, s, "warm-up", 1, say=False)


def serve_rank(rank: int, world: int, port: int, queue, body) -> None:
    """One spawned gloo rank: join the group, run ``body(rank, world)``, send rank 0's result (or the error)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = body(rank, world)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, "ok", result if rank == 0 else None))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def _worker(rank: int, world: int, port: int, s: Settings, many: bool, queue) -> None:
    serve_rank(rank, world, port, queue, lambda r, w: _run_all(r, w, s, many))


def _run_all(rank: int, world: int, s: Settings, many: bool) -> dict:
    import itertools

    from .contenders import Opts

    o = Opts(rank, world, s.threads, False, s.max_shard_size, s.checksums)
    counter = itertools.count()
    if s.warm_up:
        _warm_up(o, s)
    _settle()
    cases = []
    for case in s.cases:
        oc = Opts(rank, world, s.threads, case.durable, s.max_shard_size, s.checksums)
        cases.append(_run_case(case, oc, s, counter))
    return {"cases": cases, "many": _run_many(o, s, counter) if many else None}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, s, many: bool, timeout: float, worker=None) -> dict:
    """Spawn ``world`` ranks running ``worker`` (default: this module's) and return rank 0's result."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=worker or _worker, args=(r, world, port, s, many, queue)) for r in range(world)]
    for p in procs:
        p.start()
    deadline, got, result = time.monotonic() + timeout, 0, None
    try:
        while got < world:
            if queue.empty():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"benchmark workers (world {world}) still running after {timeout:.0f} s")
                if not any(p.is_alive() for p in procs) and queue.empty():
                    raise RuntimeError(
                        f"benchmark workers (world {world}) died: exit codes {[p.exitcode for p in procs]}"
                    )
                time.sleep(0.05)
                continue
            rank, status, value = queue.get()
            got += 1
            if status == "error":
                raise RuntimeError(f"benchmark rank {rank} of {world} failed:\n{value}")
            if rank == 0:
                result = value
    finally:
        for p in procs:
            p.join(5 if got == world else 0.1)
            if p.is_alive():
                p.kill()
    return result


# -- summary, tables, JSON ------------------------------------------------------------------------
def summarize(runs: dict[str, list], nbytes: int, bound: str | None = N.BOUND, torch_name: str | None = None) -> dict:
    out = {}
    for name, rs in runs.items():
        if not rs:
            continue
        med = statistics.median(r["s"] for r in rs)
        out[name] = {
            "median_s": med,
            "gbps": nbytes / med / 1e9 if med > 0 else 0.0,
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "mem_mb": max(max(r["mem_mb"]) for r in rs),
            "runs": rs,
        }
    for v in out.values():
        if bound in out:
            v["x_bound"] = out[bound]["median_s"] / v["median_s"]
        if torch_name in out:
            v["x_torch"] = out[torch_name]["median_s"] / v["median_s"]
    return out


def _table(title: str, rows: list[tuple[str, dict]], with_gbps: bool = True) -> str:
    head = (
        f"{'case':<24} {'contender':<30} {'median s':>9}"
        + (f" {'GB/s':>7} {'x bound':>8}" if with_gbps else "")
        + f" {'x torch':>8} {'cpu s':>7} {'mem MB':>8}"
    )
    lines = [title, head, "-" * len(head)]
    last = None
    for label, summ in rows:
        for name, v in summ.items():
            lines.append(
                f"{label if label != last else '':<24} {name:<30} {v['median_s']:9.3f}"
                + (f" {v['gbps']:7.2f} {v.get('x_bound', float('nan')):8.2f}" if with_gbps else "")
                + f" {v.get('x_torch', float('nan')):8.2f} {v['cpu_s']:7.2f} {v['mem_mb']:8.1f}"
            )
            last = label
    return "\n".join(lines)


def report(data: dict) -> str:
    parts = []
    save_rows, load_rows = [], []
    for c in data["cases"]:
        c["save_summary"] = summarize(c["save"], c["bytes"], torch_name=N.TORCH_SAVE)
        save_rows.append((c["label"], c["save_summary"]))
        if c["load"]:
            c["load_summary"] = summarize(c["load"], c["bytes"], torch_name=N.TORCH_LOAD)
            load_rows.append((c["label"], c["load_summary"]))
    note = (
        f"median of {data['meta']['reps']}, of {data['meta'].get('slow_reps', data['meta']['reps'])} for "
        f"{' and '.join(N.SLOW)}; GB/s of checkpoint bytes; x bound = bound time / contender time; "
        f"x torch = torch HF time / contender time; cpu = CPU seconds of all ranks (median); "
        f"mem = peak RSS growth, max over ranks and repetitions"
    )
    if save_rows:
        parts.append(_table(f"SAVE ({note})", save_rows))
    if load_rows:
        parts.append(_table(f"LOAD ({data['meta']['cache']} page cache; targets preallocated)", load_rows))
    m = data.get("many")
    if m:
        m["save_summary"] = summarize(m["save"], m["bytes"], bound=None, torch_name=N.TORCH_SAVE)
        m["load_summary"] = summarize(m["load"], m["bytes"], bound=None, torch_name=N.TORCH_LOAD)
        label = f"{m['count']} x fp32 8x8 W={m['world']}"
        parts.append(
            _table(
                f"MANY TENSORS (median of {data['meta']['many_reps']})",
                [(label + " save", m["save_summary"]), (label + " load", m["load_summary"])],
                with_gbps=False,
            )
        )
    if data.get("async"):
        from . import async_bench

        parts.append(async_bench.report(data["async"]))
    if data.get("objstore"):
        from . import objstore_bench

        parts.append(objstore_bench.report(data["objstore"]))
    return "\n\n".join(parts)


def spread(xs: list) -> dict | None:
    """Median, min and max of the values that are not None (None when there are none)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt_spread(v: dict | None, digits: int = 3) -> str:
    """``median (min-max)``, or ``-``."""
    if not v:
        return "-"
    return f"{v['median']:.{digits}f} ({v['min']:.{digits}f}-{v['max']:.{digits}f})"


def run_standalone(name: str, a, run_section, settings_from, report) -> dict:
    """A section run on its own (``python -m bench.<section>``): scratch directory, machine notes, the table
    printed, ``RESULTS/<name>.json`` and ``.txt`` written."""
    scratch = a.scratch or tempfile.mkdtemp(prefix=f"hf-bench-{name}-", dir="/tmp")
    os.makedirs(scratch, exist_ok=True)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "argv": sys.argv[1:],
    }
    try:
        data = run_section(settings_from(a, scratch), a.timeout)
    finally:
        if not a.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    data["meta"] = meta
    text = report(data)
    print("\n" + text + f"\n\nwall time {data['wall_s']:.0f} s", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{name}.txt").write_text(text + "\n")
    print(f"wrote {out / (name + '.json')}", flush=True)
    return data


def machine() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    from importlib.metadata import version

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "safetensors": version("safetensors"),
        "load_average": os.getloadavg(),
    }


# -- command line --------------------------------------------------------------------------------
def build_cases(a) -> list[Case]:
    cases: list[Case] = []
    for w in a.world_sizes:
        for layout in a.layouts:
            if layout not in N.LAYOUTS:
                raise SystemExit(f"unknown layout {layout!r}; choose from {', '.join(N.LAYOUTS)}")
            if layout == "2d" and (w < 4 or w % 2):
                continue
            if a.cross or (layout == "row" and w == min(a.world_sizes)):
                sizes = a.sizes
            else:
                sizes = [a.size]
            cases += [Case(w, layout, sz) for sz in sizes]
        if a.durable_size and w == min(a.world_sizes):
            cases.append(Case(w, "row", a.durable_size, durable=True))
    return cases


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition, 2 000 tiny tensors (smoke test)")
    p.add_argument("--section", choices=("all", "main", "many-tensors", "async", "objstore"), default="all")
    p.add_argument(
        "--sizes", type=float, nargs="+", help="GB; the row layout at the smallest world size (default 0.5 1 2)"
    )
    p.add_argument("--size", type=float, help="GB for the other layouts / world sizes (default 0.5)")
    p.add_argument("--durable-size", type=float, help="GB for the durable save case; 0 skips it (default 0.5)")
    p.add_argument("--cross", action="store_true", help="every size for every layout and world size")
    p.add_argument("--layouts", nargs="+", default=["row", "col", "2d"])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--reps", type=int, help="repetitions per contender (default 3; --quick 1)")
    p.add_argument(
        "--slow-reps",
        type=int,
        default=1,
        help=f"repetitions of the slow contenders ({', '.join(N.SLOW)}) in the main section (default 1)",
    )
    p.add_argument(
        "--profile",
        nargs="+",
        default=[],
        metavar="CONTENDER",
        help="cProfile these contenders on rank 0 (every run; the runs are slower): "
        "RESULTS/profile-*.prof, top functions printed at the end",
    )
    p.add_argument("--threads", type=int, default=4, help="thread_count given to every contender that takes one")
    p.add_argument("--max-shard-size", default="5GB", help="file size policy for our writers ('none' = one file)")
    p.add_argument("--many-count", type=int, help="tensors in the many-tensors section (default 50000; --quick 2000)")
    p.add_argument("--many-reps", type=int, help="repetitions for the many-tensors section (default 1)")
    p.add_argument("--contenders", nargs="+", help="only these contenders (names as printed; the bound is always run)")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache before loads")
    p.add_argument(
        "--checksums",
        choices=("default", "on", "off"),
        default="default",
        help="checksums= for this project's writers (default: their own default)",
    )
    p.add_argument("--no-warm-up", action="store_true", help="skip the untimed warm-up run of every contender")
    p.add_argument("--scratch", help="directory for checkpoint files (default: a fresh one under /tmp)")
    p.add_argument("--out", default=str(RESULTS), help="results directory (JSON and PNG)")
    p.add_argument("--no-docs", action="store_true", help="do not copy the plot to docs/bench.png")
    p.add_argument("--from-json", metavar="PATH", help="run nothing: redraw the tables and plot from a bench.json")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a world size's workers are killed")
    from . import async_bench, objstore_bench

    async_bench.add_args(p)
    objstore_bench.add_args(p)
    a = p.parse_args(argv)
    q = a.quick
    a.sizes = a.sizes or ([0.064] if q else [0.5, 1.0, 2.0])
    a.size = a.size if a.size is not None else (0.064 if q else 0.5)
    a.durable_size = a.durable_size if a.durable_size is not None else (0.064 if q else 0.5)
    a.reps = a.reps or (1 if q else 3)
    a.many_count = a.many_count if a.many_count is not None else (2000 if q else 50000)
    a.many_reps = a.many_reps or 1
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.from_json:
        data = json.loads(Path(a.from_json).read_text())
        text = report(data)
        print(text + f"\n\ntotal wall time {data['meta'].get('wall_s', 0):.0f} s", flush=True)
        _publish(data, text, a, time.time())
        return data

    def pick(names):
        return [n for n in names if n == N.BOUND or not a.contenders or n in a.contenders]

    cold = not a.warm and can_drop_caches()
    scratch = a.scratch or tempfile.mkdtemp(prefix="hf-bench-", dir="/tmp")
    os.makedirs(scratch, exist_ok=True)
    cases = build_cases(a) if a.section in ("all", "main") else []
    many_world = 2 if a.section in ("all", "many-tensors") and a.many_count > 0 else None
    settings = Settings(
        reps=a.reps,
        threads=a.threads,
        max_shard_size=None if str(a.max_shard_size).lower() == "none" else a.max_shard_size,
        cold=cold,
        scratch=scratch,
        save_names=pick(N.SAVE),
        load_names=pick(N.LOAD),
        many_count=a.many_count,
        many_reps=a.many_reps,
        warm_up=not a.no_warm_up,
        slow_reps=min(a.slow_reps, a.reps),
        profile=list(a.profile),
        out_dir=a.out,
        checksums={"default": None, "on": True, "off": False}[a.checksums],
    )
    started, started_wall = time.perf_counter(), time.time()
    data = {
        "meta": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(),
            "reps": a.reps,
            "many_reps": a.many_reps,
            "threads": a.threads,
            "slow_reps": settings.slow_reps,
            "checksums": a.checksums,
            "cache": "cold" if cold else "warm",
            "max_shard_size": settings.max_shard_size,
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "cases": [],
        "many": None,
    }
    print(f"scratch {scratch}; loads read a {data['meta']['cache']} page cache", flush=True)
    try:
        worlds = sorted({c.world for c in cases} | ({many_world} if many_world else set()))
        for w in worlds:
            s = dataclasses.replace(settings, cases=[c for c in cases if c.world == w])
            res = run_world(w, s, many=(w == many_world), timeout=a.timeout)
            data["cases"] += res["cases"]
            data["many"] = res["many"] or data["many"]
        if a.section in ("all", "async"):
            from . import async_bench

            data["async"] = async_bench.run_section(async_bench.settings_from(a, scratch), a.timeout)
        if a.section in ("all", "objstore"):
            from . import objstore_bench

            missing = objstore_bench.unavailable()
            if missing and a.section == "all":
                print(f"skipping the objstore section: {missing}", flush=True)
            else:
                data["objstore"] = objstore_bench.run_section(objstore_bench.settings_from(a, scratch), a.timeout)
    finally:
        if not a.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    data["meta"]["wall_s"] = time.perf_counter() - started
    text = report(data)
    print("\n" + text + f"\n\ntotal wall time {data['meta']['wall_s']:.0f} s", flush=True)
    _publish(data, text, a, started_wall)
    return data


def _publish(data: dict, text: str, a, started_wall: float) -> None:
    """Write the JSON, the table and the plot; a full run into the default directory also updates docs/."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    (out / "bench.txt").write_text(text + "\n")
    from .plot import plot

    png = plot(data, out / "bench.png") if data["cases"] or data.get("many") else None
    if png and not a.quick and not a.no_docs and out.resolve() == RESULTS.resolve():
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(png, REPO / "docs" / "bench.png")
    print(f"wrote {out / 'bench.json'}" + (f" and {png}" if png else ""), flush=True)
    _print_profiles(out, started_wall)


def _print_profiles(out: Path, since: float) -> None:
    import pstats

    for path in sorted(out.glob("profile-*.prof")):
        if path.stat().st_mtime >= since:
            print(f"\n{path} (rank 0; top by own time)")
            pstats.Stats(str(path)).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
