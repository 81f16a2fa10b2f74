"""Saving straight to an object store, side by side with what users do today: save locally, then upload.

    .venv/bin/python -m bench.objstore_bench                     # 2 ranks, 1 GB bf16, rows then columns, 3 reps
    .venv/bin/python -m bench.objstore_bench --objstore-gb 0.5 --reps 5 --layouts row
    .venv/bin/python -m bench.run --section objstore             # the same, as a section of ``make bench``

The store is moto's S3 server (``moto_server``, from the ``test`` extra) on 127.0.0.1 over plain HTTP, started
by rank 0 in a subprocess with :class:`tests.s3_server.MotoServer`, the tests' own helper (a module of the
standard library only; ``bench`` imports it from ``tests`` because the repository root is on the path whenever
``python -m bench...`` runs from it). Every client is pointed at it through the environment
(:func:`tests.s3_server.s3_environ`), and a developer's ``~/.aws`` is kept out.

Contenders (2 long-lived gloo ranks, the same sharded llama-like bf16 state, ``max_shard_size`` 500 MB):
  * ``ours direct``: ``hf_storage.save(state, "s3://bench/<run>/<layout>-ours-direct-N", max_shard_size=...)``
    on both ranks (library defaults otherwise: ``thread_count``, checksums, ``HF_STORAGE_PART_SIZE`` unset
    unless the caller's environment sets it; the part size used is reported);
  * ``save then upload``: ``hf_storage.save`` to a local directory on both ranks, then rank 0 uploads every
    file with boto3's own multi-threaded transfer (``client.upload_file`` with
    ``TransferConfig(max_concurrency=8, multipart_chunksize=32 MiB)``; ``--objstore-concurrency``,
    ``--objstore-chunk-mib``), the index last; both phases timed;
  * ``raw bound``: each rank uploads the bytes of its local shards (the tensors it owns, back to back, read
    from their memory through a seekable file object over memoryviews: no disk, no concatenated copy) as one
    object of its own, with ``upload_fileobj`` and the same ``TransferConfig``.
  The two boto3 contenders use a client with the library's transport settings (standard retries, a pool of 64
  connections, checksums only when required), so the comparison is of the checkpoint paths, not of client
  settings. s3transfer copies every part of a file object into a ``BytesIO`` before sending it (up to 10
  parts queued), so the raw bound's RSS is that queue, not a property of the data.

Method
  * One untimed warm-up of every contender on a tiny state (clients, connection pools, moto's first
    requests); per layout, one untimed raw local write of the state (first-touch page-cache cost).
  * ``--reps`` repetitions, contenders alternating in rotated order. Each run writes to a fresh prefix; after
    it, outside the clock, every object under the run's prefix is deleted and every multipart upload left
    under it aborted, and local files removed. That does not give moto's memory back: moto 5 keeps every
    object it ever created in a class-level list (``instances_tracked``) and request bodies in reference
    cycles: 0.5-1.7 GB were left after the deletes of each 1 GB run, and without restarts it peaked at 5.2 GB
    within three runs. Whenever its RSS after the deletes exceeds ``moto_rss_limit_mb`` (512 MB; at 1 GB that
    is after nearly every run, in the smoke test never) rank 0 restarts it, outside the clock, and every rank
    re-points its clients at the new server; one request of every kind the contenders make is sent to a new
    server first (moto imports lazily).
  * A run's time is the slowest rank's, after a barrier; throughput = checkpoint tensor bytes / that time.
    RSS: each rank samples its RSS every 2 ms (``bench/rss.py``); growth = peak during the run - RSS just
    before it; max over ranks and repetitions. ``cpu s``: user + system seconds of both ranks.
  * moto: its process's CPU seconds during each run (``/proc/<pid>/stat``) and ``busy`` = that / wall time
    (1.0 = one core: moto serves requests on threads of one Python process); its RSS sampled every 10 ms.
  * Once per layout, the objects of the first ``ours direct`` run are compared with a local
    ``hf_storage.save`` of the same state: same file names, sizes and SHA-256 (each rank hashes half of the
    files, streaming); the index is compared without the ``object_etags`` entry that only saves to a store
    write, and that entry must match the ETags the store reports. A mismatch fails the section.
  * Medians with (min-max) over the repetitions.

Output: the tables on stdout, ``RESULTS/objstore.json`` (or the ``"objstore"`` entry of ``bench.json`` under
``bench.run``) with every run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import hashlib
import io
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import run as R
from .rss import RssPeak

WORLD = 2
LAYOUTS = ("row", "col")
OURS = "ours direct"
SAVE_UPLOAD = "save then upload"
RAW = "raw bound"
NAMES = (OURS, SAVE_UPLOAD, RAW)
MIB = 2**20
RSS_SLACK_MB = 200  # the memory target: growth <= local shards + 200 MB
INDEX = "model.safetensors.index.json"
ETAGS_KEY = "object_etags"  # index metadata only saves to a store write (hf_storage.remote.ETAGS_KEY)


@dataclass
class ObjSettings:
    gb: float = 1.0
    reps: int = 3
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    names: list[str] = field(default_factory=lambda: list(NAMES))
    max_shard_size: str = "500MB"
    concurrency: int = 8  # TransferConfig.max_concurrency of the boto3 contenders
    chunk: int = 32 * MIB  # TransferConfig.multipart_chunksize
    bucket: str = "bench"
    run: str = ""  # key prefix of this run's objects
    scratch: str = ""
    check: bool = True
    warm_up: bool = True
    moto_rss_limit_mb: float = 512  # moto is restarted (untimed) when its RSS after a run's deletes exceeds this


# -- the store ----------------------------------------------------------------------------------------------
def unavailable() -> str | None:
    """Why the section cannot run here (no ``moto_server`` or no boto3: the ``test`` extra), or None."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        return "boto3 is not installed"
    if not Path(sys.executable).with_name("moto_server").exists() and shutil.which("moto_server") is None:
        return "moto_server not found (pip install 'moto[server]', part of the test extra)"
    return None


def _start_store(env: Env) -> None:
    """(Re)start moto on rank 0 and point every rank's clients at it (collective; outside the clock): a fresh
    bucket, this rank's boto3 client and the library's cached client for the new endpoint, and one request of
    every kind the contenders make, so that moto's first-request imports stay out of the timings."""
    import torch.distributed as dist

    from hf_storage import objstore
    from tests.s3_server import AWS_UNSET, MotoServer, s3_environ

    info: list = [None]
    if env.rank == 0:
        if env.server is not None:
            env.server.stop()
        env.server = MotoServer()
        info = [(env.server.endpoint, env.server._proc.pid)]  # MotoServer keeps its Popen as _proc
    dist.broadcast_object_list(info, src=0)
    env.endpoint, env.moto_pid = info[0]
    for k in AWS_UNSET:
        os.environ.pop(k, None)
    os.environ.update(s3_environ(env.endpoint))
    env.client = _client()
    objstore.client()
    if env.rank == 0:
        _exercise(env)
    env.starts += 1
    dist.barrier()


def _exercise(env: Env) -> None:
    c, b, k = env.client, env.s.bucket, f"{env.s.run}/.exercise"
    c.create_bucket(Bucket=b)
    c.put_object(Bucket=b, Key=k, Body=b"x", IfNoneMatch="*")
    c.head_object(Bucket=b, Key=k)
    c.get_object(Bucket=b, Key=k)["Body"].read()
    for abort in (False, True):
        up = c.create_multipart_upload(Bucket=b, Key=f"{k}-{abort}")["UploadId"]
        etag = c.upload_part(Bucket=b, Key=f"{k}-{abort}", UploadId=up, PartNumber=1, Body=b"y")["ETag"]
        if abort:
            c.abort_multipart_upload(Bucket=b, Key=f"{k}-{abort}", UploadId=up)
        else:
            parts = {"Parts": [{"PartNumber": 1, "ETag": etag}]}
            c.complete_multipart_upload(Bucket=b, Key=f"{k}-{abort}", UploadId=up, MultipartUpload=parts)
    c.list_multipart_uploads(Bucket=b, Prefix=f"{env.s.run}/")
    listed = c.list_objects_v2(Bucket=b, Prefix=f"{env.s.run}/").get("Contents", [])
    c.delete_objects(Bucket=b, Delete={"Objects": [{"Key": o["Key"]} for o in listed], "Quiet": True})
    c.delete_object(Bucket=b, Key=k)


def _maybe_restart(env: Env) -> bool:
    """After a run's deletes: restart moto when its RSS exceeds the limit (moto 5 keeps every object it ever
    created in a class-level list, and request bodies in reference cycles, long after the deletes)."""
    import torch.distributed as dist

    flag = [None]
    if env.rank == 0:
        rss = _moto_rss_mb(env)
        flag = [rss is not None and rss > env.s.moto_rss_limit_mb]
    dist.broadcast_object_list(flag, src=0)
    if flag[0]:
        _start_store(env)
    return bool(flag[0])


# -- measurement helpers (inside the workers) ---------------------------------------------------------------
def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads); 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class PidPeak(RssPeak):
    """:class:`RssPeak` of another process (``pid``): its resident memory, sampled in a thread."""

    def __init__(self, pid: int, period: float = 0.01):
        super().__init__(period)
        os.close(self._fd)
        self._fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY)


class Segments(io.RawIOBase):
    """A read-only, seekable file over memoryviews laid back to back: what ``upload_fileobj`` reads its parts
    from, without a concatenated copy of the data (``read`` copies the requested range once, as a file would)."""

    def __init__(self, views: list[memoryview]):
        self.views = [v for v in views if len(v)]
        self.starts, pos = [], 0
        for v in self.views:
            self.starts.append(pos)
            pos += len(v)
        self.size, self.pos = pos, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _slices(self, n: int) -> list[memoryview]:
        import bisect

        out, pos, end = [], self.pos, min(self.size, self.pos + n)
        i = max(0, bisect.bisect_right(self.starts, pos) - 1)
        while pos < end:
            v, s = self.views[i], self.starts[i]
            take = min(len(v) - (pos - s), end - pos)
            out.append(v[pos - s : pos - s + take])
            pos += take
            i += 1
        self.pos = end
        return out

    def read(self, size: int | None = -1) -> bytes:
        return b"".join(self._slices(self.size - self.pos if size is None or size < 0 else size))

    def readinto(self, b) -> int:
        dst, got = memoryview(b).cast("B"), 0
        for piece in self._slices(len(b)):
            dst[got : got + len(piece)] = piece
            got += len(piece)
        return got

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, min(self.size, base + offset))
        return self.pos

    def tell(self) -> int:
        return self.pos


@dataclass
class Env:
    rank: int
    world: int
    s: ObjSettings
    transfer: object  # boto3.s3.transfer.TransferConfig
    o: object  # bench.contenders.Opts, for the raw local priming write
    client: object = None  # a boto3 S3 client with the library's transport settings, for the current server
    server: object = None  # rank 0: the tests.s3_server.MotoServer
    endpoint: str = ""
    moto_pid: int = 0
    starts: int = 0  # moto servers started


def _client():
    import boto3
    from botocore.config import Config

    # The transport settings of hf_storage.objstore's own client (see the module docstring).
    config = Config(
        retries={"mode": "standard", "max_attempts": 10},
        max_pool_connections=64,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", config=config)


# -- contenders: fn(state, key, env), key = the run's prefix inside the bucket ------------------------------
def _ours(state, key: str, env: Env) -> None:
    import hf_storage

    hf_storage.save(state, f"s3://{env.s.bucket}/{key}", max_shard_size=env.s.max_shard_size)


def _local_dir(key: str, env: Env) -> str:
    return os.path.join(env.s.scratch, key.replace("/", "-"))


def _save_upload(state, key: str, env: Env) -> None:
    import hf_storage

    local = _local_dir(key, env)
    hf_storage.save(state, local, max_shard_size=env.s.max_shard_size)
    if env.rank != 0:
        return
    names = sorted(n for n in os.listdir(local) if os.path.isfile(os.path.join(local, n)))
    names = [n for n in names if n != INDEX] + [n for n in names if n == INDEX]  # the index last
    for name in names:
        env.client.upload_file(os.path.join(local, name), env.s.bucket, f"{key}/{name}", Config=env.transfer)


def _raw(state, key: str, env: Env) -> None:
    from . import contenders as C

    views = [C._as_bytes(t.to_local()) for t in state.values() if C.owns(t)]
    env.client.upload_fileobj(Segments(views), env.s.bucket, f"{key}/rank-{env.rank}.bin", Config=env.transfer)


CONTENDERS = {OURS: _ours, SAVE_UPLOAD: _save_upload, RAW: _raw}


def _cleanup(key_prefix: str, env: Env, local: str | None = None) -> None:
    """Rank 0, between barriers: delete every object under ``key_prefix``, abort every upload left under it,
    remove ``local``."""
    import torch.distributed as dist

    dist.barrier()
    if env.rank == 0:
        c, bucket = env.client, env.s.bucket
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                c.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key_prefix):
            for u in page.get("Uploads", []):
                c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        if local:
            shutil.rmtree(local, ignore_errors=True)
            os.sync()
    dist.barrier()


def _measured(fn, env: Env) -> dict:
    """``bench.run.timed`` (slowest rank's seconds, every rank's RSS growth, CPU of both ranks), plus moto's CPU
    seconds and peak RSS during the run (rank 0 reads them)."""
    pid = env.moto_pid if env.rank == 0 else 0
    with contextlib.ExitStack() as stack:
        peak = stack.enter_context(PidPeak(pid)) if pid else None
        c0 = _proc_cpu(pid) if pid else 0.0
        r = R.timed(fn)
        cpu = _proc_cpu(pid) - c0 if pid else 0.0
    if peak is not None:
        r["moto_cpu_s"] = cpu
        r["moto_rss_peak_mb"] = peak.peak / 1e6
    return r


def _moto_rss_mb(env: Env) -> float | None:
    try:
        with open(f"/proc/{env.moto_pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, IndexError, ValueError):
        return None


# -- the byte-identity check -----------------------------------------------------------------------------
def _sha_file(path: str) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def _sha_object(env: Env, key: str) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    body = env.client.get_object(Bucket=env.s.bucket, Key=key)["Body"]
    try:
        while chunk := body.read(8 * MIB):
            h.update(chunk)
            n += len(chunk)
    finally:
        body.close()
    return n, h.hexdigest()


def _index_object(env: Env, key: str) -> tuple[tuple[int, str], list[str]]:
    """The index object's (size, SHA-256) without the ``object_etags`` entry that only saves to a store write
    (serialized as the writer does, as ``tests/test_s3_save.py`` compares it), and what is wrong with that entry:
    it must name every weights file with the ETag the store reports for it."""
    raw = env.client.get_object(Bucket=env.s.bucket, Key=f"{key}/{INDEX}")["Body"].read()
    index = json.loads(raw)
    etags = index.get("metadata", {}).pop(ETAGS_KEY, None)
    problems = []
    if etags is not None:
        listed = env.client.list_objects_v2(Bucket=env.s.bucket, Prefix=f"{key}/").get("Contents", [])
        stored = {o["Key"][len(key) + 1 :]: o["ETag"] for o in listed if o["Key"].endswith(".safetensors")}
        if etags != stored:
            problems.append(f"{INDEX}: {ETAGS_KEY} {etags} != the store's ETags {stored}")
        raw = json.dumps(index, indent=2).encode() + b"\n"
    return (len(raw), hashlib.sha256(raw).hexdigest()), problems


def _check(state, key: str, env: Env) -> dict:
    """The objects under ``key`` against a local ``hf_storage.save`` of ``state``: names, sizes and SHA-256 (the
    index without its ``object_etags``, which are checked against the store's). Raises AssertionError on every
    rank when anything differs."""
    import torch.distributed as dist

    import hf_storage

    local = _local_dir(key, env) + "-check"
    hf_storage.save(state, local, max_shard_size=env.s.max_shard_size)
    files = sorted(n for n in os.listdir(local) if os.path.isfile(os.path.join(local, n)))
    listed = env.client.list_objects_v2(Bucket=env.s.bucket, Prefix=f"{key}/").get("Contents", [])
    objects = sorted(o["Key"][len(key) + 1 :] for o in listed)
    mine = {}
    for name in files[env.rank :: env.world]:
        mine[name] = {"local": _sha_file(os.path.join(local, name))}
        if name == INDEX and name in objects:
            mine[name]["object"], mine[name]["problems"] = _index_object(env, key)
        elif name in objects:
            mine[name]["object"] = _sha_object(env, f"{key}/{name}")
    every: list = [None] * env.world
    dist.all_gather_object(every, mine)
    R._cleanup(local, env.rank)  # barrier, rank 0 removes the local copy, barrier
    found = {name: v for part in every for name, v in part.items()}
    problems = []
    if files != objects:
        problems.append(f"names differ: local {files}, objects {objects}")
    for name, v in sorted(found.items()):
        if v.get("object") is not None and v["object"] != v["local"]:
            problems.append(f"{name}: object {v['object']} != local {v['local']} (bytes, sha256)")
        problems += v.get("problems", [])
    if problems:
        raise AssertionError(f"{OURS} wrote objects that differ from the local save: " + "; ".join(problems))
    return {
        "identical": True,
        "files": {name: {"bytes": v["local"][0], "sha256": v["local"][1]} for name, v in sorted(found.items())},
    }


# -- one layout --------------------------------------------------------------------------------------------
def _run_layout(layout: str, env: Env, counter) -> dict:
    from hf_storage import objstore

    from . import contenders as C
    from .models import llama_like

    s = env.s
    cfg = llama_like(int(s.gb * 1e9))
    state = C.llama_state(cfg, layout, C.mesh_for(layout, env.world))
    R._settle()
    import torch
    import torch.distributed as dist

    local = torch.tensor([C.local_bytes(state)], dtype=torch.int64)
    every = [torch.empty_like(local) for _ in range(env.world)]
    dist.all_gather(every, local)
    res = {
        "layout": layout,
        "bytes": C.total_bytes(state),
        "local_bytes": [int(t) for t in every],
        "config": cfg,
        "part_size": objstore.part_size(int(s.gb * 1e9)),
        "runs": {n: [] for n in s.names},
        "check": None,
    }
    R._say(
        env.rank,
        f"objstore {layout}: {res['bytes'] / 1e9:.3f} GB, {len(state)} tensors, local shards "
        f"{' / '.join(f'{b / 1e9:.3f}' for b in res['local_bytes'])} GB per rank",
    )
    prime = os.path.join(s.scratch, f"prime-{next(counter)}")
    C.save_raw(state, prime, env.o)
    R._cleanup(prime, env.rank)
    for rep in range(s.reps):
        for name in R._rotated(list(s.names), rep):
            key = f"{s.run}/{layout}-{name.replace(' ', '-')}-{next(counter)}"
            r = _measured(functools.partial(CONTENDERS[name], state, key, env), env)
            if name == OURS and s.check and res["check"] is None:
                res["check"] = _check(state, key, env)
                files = res["check"]["files"]
                R._say(
                    env.rank,
                    f"  [{layout}] {OURS}: {len(files)} objects byte-identical to a local save "
                    f"({sum(f['bytes'] for f in files.values())} bytes, sizes and sha256)",
                )
            _cleanup(f"{key}/", env, _local_dir(key, env) if name == SAVE_UPLOAD else None)
            if env.rank == 0:
                r["moto_rss_after_mb"] = _moto_rss_mb(env)
            r["moto_restarted"] = _maybe_restart(env)
            res["runs"][name].append(r)
            R._say(
                env.rank,
                f"  [{layout} rep {rep}] {name:<18} {r['s']:8.3f} s {res['bytes'] / r['s'] / 1e9:6.3f} GB/s  "
                f"RSS {max(r['mem_mb']):7.1f} MB  moto cpu {r.get('moto_cpu_s', 0):6.2f} s  "
                f"moto RSS peak {r.get('moto_rss_peak_mb', 0):7.1f} MB, after cleanup "
                f"{r.get('moto_rss_after_mb') or 0:7.1f} MB",
            )
    del state
    gc.unfreeze()
    R._settle()
    return res


# -- the workers -----------------------------------------------------------------------------------------
def _warm_up(env: Env, counter) -> None:
    """One untimed run of every contender on a tiny state."""
    from . import contenders as C

    tiny = dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        vocab_size=256,
    )
    state = C.llama_state(tiny, "row", C.mesh_for("row", env.world))
    for name in env.s.names:
        key = f"{env.s.run}/warm-{next(counter)}"
        CONTENDERS[name](state, key, env)
        _cleanup(f"{key}/", env, _local_dir(key, env))
    R._say(env.rank, f"objstore warm-up: {', '.join(env.s.names)}")


def _run_all(rank: int, world: int, s: ObjSettings) -> dict:
    import itertools

    from boto3.s3.transfer import TransferConfig

    from hf_storage import objstore, pipeline, settings

    from .contenders import Opts

    transfer = TransferConfig(max_concurrency=s.concurrency, multipart_chunksize=s.chunk)
    env = Env(rank, world, s, transfer, Opts(rank, world, 1))
    counter = itertools.count()
    try:
        _start_store(env)
        R._say(rank, f"objstore: moto_server pid {env.moto_pid} at {env.endpoint}, bucket {s.bucket}, prefix {s.run}/")
        if s.warm_up:
            _warm_up(env, counter)
        R._settle()
        layouts = [_run_layout(layout, env, counter) for layout in s.layouts]
    finally:
        if env.server is not None:
            env.server.stop()
    return {
        "layouts": layouts,
        "moto_starts": env.starts,
        "library": {
            "part_size": settings.part_size(),
            "part_size_env": os.environ.get("HF_STORAGE_PART_SIZE"),
            "thread_count": pipeline.DEFAULT_THREADS,
            "max_pool_connections": objstore.client().meta.config.max_pool_connections,
        },
    }


def _worker(rank: int, world: int, port: int, s: ObjSettings, _many: bool, queue) -> None:
    R.serve_rank(rank, world, port, queue, lambda r, w: _run_all(r, w, s))


def run_section(s: ObjSettings, timeout: float = 3600) -> dict:
    """Run the section in its own pool of ``WORLD`` gloo ranks (rank 0 runs moto); rank 0's results."""
    started = time.perf_counter()
    if not s.run:
        s = dataclasses.replace(s, run=datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S"))
    res = R.run_world(WORLD, s, False, timeout, worker=_worker)
    res["settings"] = asdict(s)
    res["world"] = WORLD
    res["wall_s"] = time.perf_counter() - started
    return res


def fmt(v: dict | None, digits: int = 2) -> str:
    return R.fmt_spread(v, digits)


# -- summary and tables (parent process, no torch) --------------------------------------------------------
def summarize(layout: dict) -> dict:
    out = {}
    for name, runs in layout["runs"].items():
        if not runs:
            continue
        out[name] = {
            "s": R.spread([r["s"] for r in runs]),
            "gbps": R.spread([layout["bytes"] / r["s"] / 1e9 for r in runs]),
            "mem_mb": max(max(r["mem_mb"]) for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "moto_cpu_s": R.spread([r.get("moto_cpu_s") for r in runs]),
            "moto_busy": R.spread([r["moto_cpu_s"] / r["s"] for r in runs if r.get("moto_cpu_s") is not None]),
            "moto_rss_peak_mb": max((r.get("moto_rss_peak_mb") or 0 for r in runs), default=0),
        }
    return out


def ratios(layout: dict, summ: dict) -> dict:
    """The issue's targets for ``ours direct``: (value, target, 'le' | 'ge')."""
    if OURS not in summ:
        return {}
    ours = summ[OURS]["s"]["median"]
    out: dict = {}
    if RAW in summ:
        out["x raw bound (raw s / ours s)"] = (summ[RAW]["s"]["median"] / ours, 0.7, "ge")
    if SAVE_UPLOAD in summ:
        out["x save then upload (s+u s / ours s)"] = (summ[SAVE_UPLOAD]["s"]["median"] / ours, 1.5, "ge")
    budget = max(layout["local_bytes"]) / 1e6 + RSS_SLACK_MB
    out[f"RSS growth / (local + {RSS_SLACK_MB} MB)"] = (summ[OURS]["mem_mb"] / budget, 1.0, "le")
    return out


def _table(data: dict) -> list[str]:
    head = (
        f"{'layout':<6} {'contender':<18} {'seconds':>22} {'GB/s':>22} {'RSS MB':>8} {'x ours':>7} {'cpu s':>7} "
        f"{'moto cpu s':>22} {'moto busy':>19} {'moto RSS MB':>11}"
    )
    lines = [head, "-" * len(head)]
    for lay in data["layouts"]:
        summ = lay["summary"]
        ours = summ.get(OURS, {}).get("s")
        for i, (name, v) in enumerate(summ.items()):
            x = v["s"]["median"] / ours["median"] if ours else float("nan")
            lines.append(
                f"{lay['layout'] if i == 0 else '':<6} {name:<18} {fmt(v['s'], 3):>22} {fmt(v['gbps'], 3):>22} "
                f"{v['mem_mb']:8.1f} {x:7.2f} {v['cpu_s']:7.2f} {fmt(v['moto_cpu_s']):>22} "
                f"{fmt(v['moto_busy']):>19} {v['moto_rss_peak_mb']:11.1f}"
            )
        local = " / ".join(f"{b / 1e6:.1f}" for b in lay["local_bytes"])
        check = lay.get("check")
        verdict = (
            f"byte-identical to the local save ({len(check['files'])} files, sizes and sha256)"
            if check and check.get("identical")
            else "not checked"
        )
        lines.append(
            f"{'':<6} local shards per rank {local} MB (RSS target: local + {RSS_SLACK_MB} MB = "
            f"{max(lay['local_bytes']) / 1e6 + RSS_SLACK_MB:.0f} MB); part size {lay['part_size'] / MIB:g} MiB; "
            f"{OURS}: {verdict}"
        )
    return lines


def _targets(data: dict) -> list[str]:
    lines = [f"{'layout':<6} {'figure':<38} {'value':>8} {'target':>8}  ok"]
    for lay in data["layouts"]:
        for figure, (value, target, how) in lay["ratios"].items():
            ok = value <= target if how == "le" else value >= target
            sign = "<=" if how == "le" else ">="
            lines.append(f"{lay['layout']:<6} {figure:<38} {value:8.2f} {sign}{target:6.1f}  {'yes' if ok else 'NO'}")
    return lines


def report(data: dict) -> str:
    """The object-store tables; fills in ``summary`` and ``ratios`` of every layout."""
    for lay in data["layouts"]:
        lay["summary"] = summarize(lay)
        lay["ratios"] = ratios(lay, lay["summary"])
    s, lib = data["settings"], data.get("library", {})
    gb = data["layouts"][0]["bytes"] / 1e9 if data["layouts"] else s["gb"]
    title = (
        f"OBJECT STORE ({data['world']} ranks, {gb:.2f} GB bf16 -> moto_server over HTTP on 127.0.0.1; "
        f"max_shard_size {s['max_shard_size']}; ours: part size {lib.get('part_size', 0) / MIB:g} MiB "
        f"(HF_STORAGE_PART_SIZE {lib.get('part_size_env') or 'unset'}), thread_count {lib.get('thread_count')}; "
        f"boto3: TransferConfig(max_concurrency={s['concurrency']}, multipart_chunksize={s['chunk'] / MIB:g} MiB); "
        f"median (min-max) of {s['reps']} reps; GB/s of checkpoint bytes; RSS = peak growth per rank, max over "
        f"ranks and reps; x ours = contender s / ours s; cpu = both ranks; moto busy = moto CPU s / wall s "
        f"(1.0 = one core); moto RSS = its peak)"
    )
    parts = [title, *_table(data), "", "OBJECT STORE TARGETS (medians; the issue's targets)", *_targets(data)]
    return "\n".join(parts)


# -- command line ----------------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    """The section's own options (shared with ``bench.run``)."""
    p.add_argument(
        "--objstore-gb", type=float, help="GB of bf16 state in the objstore section (default 1; --quick 0.016)"
    )
    p.add_argument(
        "--objstore-shard-size", default="500MB", help="max_shard_size of the objstore section's saves (default 500MB)"
    )
    p.add_argument("--objstore-no-check", action="store_true", help="skip the byte-identity check of ours direct")
    p.add_argument(
        "--objstore-concurrency", type=int, default=8, help="TransferConfig.max_concurrency of the boto3 contenders"
    )
    p.add_argument(
        "--objstore-chunk-mib", type=int, default=32, help="TransferConfig.multipart_chunksize (MiB) of the boto3 ones"
    )


def settings_from(a, scratch: str) -> ObjSettings:
    """ObjSettings from ``bench.run``'s (or this module's) parsed arguments."""
    gb = a.objstore_gb if a.objstore_gb is not None else (0.016 if a.quick else 1.0)
    names = [n for n in NAMES if n == RAW or not a.contenders or n in a.contenders]
    return ObjSettings(
        gb=gb,
        reps=a.reps,
        layouts=[x for x in a.layouts if x in LAYOUTS],
        names=names,
        max_shard_size=a.objstore_shard_size,
        concurrency=a.objstore_concurrency,
        chunk=a.objstore_chunk_mib * MIB,
        scratch=scratch,
        check=not a.objstore_no_check,
        warm_up=not getattr(a, "no_warm_up", False),
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.objstore_bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="0.016 GB, 1 repetition (smoke test)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--contenders", nargs="+", help=f"only these (the raw bound always runs): {', '.join(NAMES)}")
    p.add_argument("--no-warm-up", action="store_true", help="skip the untimed warm-up run of every contender")
    p.add_argument("--scratch", help="directory for local files (default: a fresh one under /tmp)")
    p.add_argument("--out", default=str(R.RESULTS), help="results directory (objstore.json, objstore.txt)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before the workers are killed")
    add_args(p)
    a = p.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    return a


def main(argv=None) -> dict:
    return R.run_standalone("objstore", parse_args(argv), run_section, settings_from, report)


if __name__ == "__main__":
    main()
