"""The save path to an object store (``s3://bucket/prefix``): every rank uploads its own bytes straight into the
final consolidated files, in one pass, with no local copy and no gather to rank 0.

Each file is one multipart upload; its parts are fixed byte ranges (:func:`.objstore.part_size`). Every rank
knows every rank's chunk boxes (one all-gather of ``(tensor, box)`` descriptors), so every rank computes the
same owner for every part: the rank that holds most of its bytes. A part only one rank holds is uploaded by
it, straight from its shard's memory when the part lies inside one of its runs. A part several ranks hold
(the boundary between two row shards; every part of a column-sharded tensor) is assembled by its owner: in
rounds that bound each owner's buffers, every rank sends the bytes it holds of that round's parts to their
owners in one ``all_to_all`` on the caller's group (byte runs in a part are a contiguous range of each
chunk's data, so a sender slices, never gathers), and the owner scatters them into the part with strided
copies. This is row assembly across the group, over the group's own collectives.

Phases, like the local path (:mod:`.pipeline`): plan (the same), describe (all-gather of descriptors),
prepare (rank 0: lock, abort what killed saves left, one upload per file; broadcast), write (rounds and
uploads), agree (gather reports: CRC shares, bytes, part ETags), publish (rank 0: the old index deleted first
when overwriting, every upload completed, stale files of the old layout deleted, extra files, the index
last: the commit point). A failure anywhere aborts every upload; a SIGKILL leaves uploads that the next save
of the prefix finds with ``ListMultipartUploads`` and aborts, once it holds the lock.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import numpy as np
import torch
import torch.distributed as dist

from . import checksum, engine, objstore, settings
from .box import Box
from .collectives import FirstError, Group
from .errors import CheckpointExistsError, CheckpointLockedError, HFStorageError
from .layout import INDEX_NAME, Layout

log = logging.getLogger(__name__)

ETAGS_KEY = "object_etags"  # index metadata: the ETag of every file, as the save completed it


# -- the parts of the files and who holds what ------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A chunk as every rank sees it: the tensor's file, the absolute offset of its first byte, its global
    shape and item size, and the chunk's box."""

    fqn: str
    file: str
    base: int
    shape: tuple[int, ...]
    itemsize: int
    box: Box

    @functools.cached_property
    def _where(self) -> tuple[np.ndarray, int, int, int]:
        starts, length = _runs(self.box, self.shape)
        starts, run = self.base + starts * self.itemsize, length * self.itemsize
        lo, hi = (int(starts[0]), int(starts[-1]) + run) if len(starts) and run else (self.base, self.base)
        return starts, run, lo, hi

    def runs(self) -> tuple[np.ndarray, int]:
        """Absolute file offsets of the chunk's runs, and their length, in bytes."""
        return self._where[0], self._where[1]

    def span(self) -> tuple[int, int]:
        """The first byte of the chunk in its file, and one past its last."""
        return self._where[2], self._where[3]

    def __getstate__(self) -> dict:  # the cached arrays stay home
        return {k: v for k, v in self.__dict__.items() if k != "_where"}


_RUNS: dict[tuple, tuple[np.ndarray, int]] = {}


def _runs(box: Box, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    key = (box, shape)
    if key not in _RUNS:
        if len(_RUNS) > 4096:
            _RUNS.clear()
        _RUNS[key] = box.runs(shape)
    return _RUNS[key]


class Clip:
    """The bytes of a piece inside file range ``[a, b)``: data bytes ``[d0, d1)`` of the piece (a contiguous
    range of its row-major data), and for each run that falls inside, where it goes."""

    def __init__(self, piece: Piece, a: int, b: int):
        starts, run = piece.runs()
        self.run = run
        i0 = int(np.searchsorted(starts, a - run, side="right")) if run else 0
        i1 = int(np.searchsorted(starts, b, side="left")) if run else 0
        self.starts, self.i0 = starts[i0:i1], i0
        if not len(self.starts):
            self.d0 = self.d1 = 0
            return
        lo = max(0, a - int(self.starts[0]))
        hi = min(run, b - int(self.starts[-1]))
        self.d0, self.d1 = i0 * run + lo, (i1 - 1) * run + hi
        self.a, self.lo, self.hi = a, lo, hi

    @property
    def nbytes(self) -> int:
        return self.d1 - self.d0

    def scatter(self, part: torch.Tensor, data: torch.Tensor) -> None:
        """Copy ``data`` (this clip's ``nbytes`` bytes, in data order) to its places in ``part`` (file bytes from
        ``a``): the clipped first and last runs one by one, whole runs between them with strided copies."""
        n, run, starts = len(self.starts), self.run, self.starts - self.a
        if n == 1:
            s = int(starts[0])
            part[s + self.lo : s + self.hi].copy_(data)
            return
        first = run - self.lo
        part[int(starts[0]) + self.lo : int(starts[0]) + run].copy_(data[:first])
        last = self.hi
        part[int(starts[-1]) : int(starts[-1]) + last].copy_(data[len(data) - last :])
        middle = data[first : len(data) - last].view(-1, run) if n > 2 else None
        if middle is None:
            return
        inner = starts[1:-1]
        for lo, hi in _arithmetic(inner):
            count = hi - lo
            step = int(inner[lo + 1] - inner[lo]) if count > 1 else run
            dst = part.as_strided((count, run), (step, 1), int(inner[lo]))
            dst.copy_(middle[lo:hi])


def _arithmetic(starts: np.ndarray) -> Iterator[tuple[int, int]]:
    """Split ``starts`` into maximal runs of equal steps: ``(lo, hi)`` index ranges."""
    n = len(starts)
    if n <= 2:
        yield 0, n
        return
    d = np.diff(starts)
    breaks = np.flatnonzero(d[1:] != d[:-1]) + 1  # a step change after index i + 1
    lo = 0
    for br in breaks.tolist():
        yield lo, br + 1
        lo = br + 1
    yield lo, n


@dataclass(frozen=True)
class FilePlan:
    name: str
    size: int
    part: int  # bytes per part
    header: bytes

    @property
    def count(self) -> int:
        return max(1, -(-self.size // self.part))

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.part, min((k + 1) * self.part, self.size)


@dataclass
class Parts:
    """Every part of every file, who holds bytes of it, and who uploads it (the same on every rank)."""

    files: list[FilePlan]
    pieces: list[list[Piece]]  # by rank
    owner: dict[tuple[int, int], int] = field(default_factory=dict)  # (file index, part) -> rank
    holders: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # ranks with bytes there

    @classmethod
    def plan(cls, layout: Layout, pieces: list[list[Piece]], part_size=objstore.part_size) -> Parts:
        """``pieces``: every rank's; ``part_size(file size)``: the part size of a file."""
        files = [FilePlan(f.name, f.size, part_size(f.size), bytes(f.header)) for f in layout.files]
        out = cls(files, pieces)
        index = {f.name: i for i, f in enumerate(files)}
        held: dict[tuple[int, int], dict[int, int]] = {}
        for rank, mine in enumerate(pieces):
            for p in mine:
                fp = files[index[p.file]]
                a, b = p.span()
                if b <= a:
                    continue
                for k in range(a // fp.part, (b - 1) // fp.part + 1):
                    lo, hi = fp.bounds(k)
                    share = held.setdefault((index[p.file], k), {})
                    share[rank] = share.get(rank, 0) + min(b, hi) - max(a, lo)
        for fi, fp in enumerate(files):
            for k in range(fp.count):
                share = held.get((fi, k), {})
                ranks = sorted(share)
                out.holders[(fi, k)] = ranks
                if not ranks:
                    out.owner[(fi, k)] = 0
                    continue
                top = max(share.values())
                best = [r for r in ranks if share[r] == top]
                out.owner[(fi, k)] = best[(fi + k) % len(best)]
        return out

    def shared(self) -> list[tuple[int, int]]:
        return [key for key, ranks in self.holders.items() if len(ranks) > 1]

    def own(self, rank: int) -> list[tuple[int, int]]:
        return [key for key, r in self.owner.items() if r == rank and len(self.holders[key]) <= 1]

    def clips(self, rank: int, key: tuple[int, int]) -> list[tuple[int, Clip]]:
        """``(piece index, clip)`` of each of ``rank``'s pieces with bytes in part ``key``, in piece order."""
        fi, k = key
        fp = self.files[fi]
        a, b = fp.bounds(k)
        out = []
        for i, p in enumerate(self.pieces[rank]):
            if p.file != fp.name:
                continue
            lo, hi = p.span()
            if hi <= a or lo >= b:
                continue
            clip = Clip(p, a, b)
            if clip.nbytes:
                out.append((i, clip))
        return out

    def rounds(self, limit: int) -> list[list[tuple[int, int]]]:
        """The shared parts in rounds in which no rank owns more than ``limit`` parts."""
        rounds: list[list[tuple[int, int]]] = []
        current: list[tuple[int, int]] = []
        counts: dict[int, int] = {}
        for key in self.shared():
            o = self.owner[key]
            if counts.get(o, 0) >= limit:
                rounds.append(current)
                current, counts = [], {}
            current.append(key)
            counts[o] = counts.get(o, 0) + 1
        if current:
            rounds.append(current)
        return rounds


# -- messages --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uploads:
    """Rank 0 locked the prefix and began one multipart upload per file."""

    ids: dict[str, str]
    had_index: bool


# -- the lock ------------------------------------------------------------------------------------


class Lease:
    """A lock on a prefix: an object ``.<name>.lock`` beside it, created only if absent (a conditional PUT),
    renewed by a thread while the save runs. One whose last renewal is older than ``HF_STORAGE_S3_LEASE``
    seconds, by the store's own clock, belongs to a dead save and is taken over."""

    def __init__(self, loc: objstore.Location):
        self.loc = loc
        self.key_name = loc.sibling(f".{loc.name or 'root'}.lock")  # a key from the bucket's root
        self.root = objstore.Location(loc.bucket, "")
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}).encode()

    def acquire(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while not objstore.put_bytes(self.root, self.key_name, self._body(), if_absent=True):
            holder, age = self._holder()
            if age is not None and age > settings.s3_lease():
                log.warning("taking over %s (%s): not renewed for %.0f s", self.key_name, holder, age)
                objstore.delete(self.root, self.key_name)
                continue
            if time.monotonic() >= deadline:
                left = "" if age is None else f"; if its holder died, it expires in {settings.s3_lease() - age:.0f} s"
                raise CheckpointLockedError(
                    f"another save of {self.loc.uri} is in progress ({holder}){left}; wait for it, save to another "
                    "prefix, or pass lock_wait=<seconds> to wait for it"
                )
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self.thread = threading.Thread(target=self._renew, name="hf_storage-lease", daemon=True)
        self.thread.start()

    def _holder(self) -> tuple[str, float | None]:
        try:
            r = objstore.client().get_object(Bucket=self.loc.bucket, Key=self.key_name)
            info = json.loads(r["Body"].read())
            server_now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
            age = (server_now - r["LastModified"]).total_seconds()
            return f"host {info['host']}, pid {info['pid']}, started {time.ctime(info['start'])}", age
        except Exception:  # gone meanwhile, or not ours to parse
            return "holder unknown", None

    def _renew(self) -> None:
        while not self.stop.wait(settings.s3_lease() / 4):
            try:
                objstore.put_bytes(self.root, self.key_name, self._body())
            except Exception as e:  # the save itself will fail or finish; keep trying
                log.warning("could not renew the lock %s: %s", self.key_name, e)

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            try:
                objstore.delete(self.root, self.key_name)
            except Exception as e:
                log.warning("could not remove the lock %s: %s (it expires on its own)", self.key_name, e)


# -- prepare ---------------------------------------------------------------------------------------


@dataclass
class Session:
    """Rank 0's hold on a save in progress: the lock and the uploads to complete or abort."""

    loc: objstore.Location
    lease: Lease
    uploads: dict[str, str]
    had_index: bool

    def abort(self) -> None:
        try:
            for name, upload_id in self.uploads.items():
                try:
                    objstore.abort_upload(self.loc, self.loc.key(name), upload_id)
                except Exception as e:
                    log.warning("could not abort the upload of %s/%s: %s (the next save does)", self.loc.uri, name, e)
        finally:
            self.lease.release()


def prepare(loc: objstore.Location, layout: Layout, overwrite: bool, lock_wait: float) -> Session:
    """Rank 0: lock the prefix, refuse or plan to replace an existing checkpoint, abort uploads that dead saves
    left under the prefix, and begin one multipart upload per file."""
    lease = Lease(loc)
    lease.acquire(lock_wait)
    session = Session(loc, lease, {}, False)
    try:
        session.had_index = objstore.head(loc, INDEX_NAME) is not None
        if session.had_index and not overwrite:
            raise CheckpointExistsError(
                f"{loc.uri} already holds a checkpoint; pass overwrite=True (launcher: output.overwrite=replace) "
                "or choose another prefix"
            )
        left = objstore.uploads(loc)
        for key, upload_id in left:
            log.warning("aborting the upload of s3://%s/%s left by an interrupted save", loc.bucket, key)
            objstore.abort_upload(loc, key, upload_id)
        for f in layout.files:
            session.uploads[f.name] = objstore.create_upload(loc, f.name)
    except BaseException:
        session.abort()
        raise
    return session


# -- write -----------------------------------------------------------------------------------------


class _View(io.RawIOBase):
    """A read-only, seekable file over a memoryview: a request body botocore can rewind for a retry."""

    def __init__(self, mv: memoryview):
        self.mv, self.pos = mv, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self.mv) - self.pos)
        b[:n] = self.mv[self.pos : self.pos + n]
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        end = len(self.mv) if size is None or size < 0 else min(len(self.mv), self.pos + size)
        out = bytes(self.mv[self.pos : end])
        self.pos = end
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.mv)}[whence]
        self.pos = max(0, min(len(self.mv), base + offset))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __len__(self) -> int:
        return len(self.mv)


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A chunk's data as a flat uint8 CPU tensor (a host copy only for CUDA / non-contiguous data)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().to("cpu", copy=True).contiguous()
    flat = t.detach().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


class Uploader:
    """This rank's uploads: at most ``limit`` parts in flight on ``threads`` threads; the first error kept."""

    def __init__(self, loc: objstore.Location, ids: Mapping[str, str], threads: int, limit: int):
        self.loc, self.ids = loc, ids
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="hf_storage-upload")
        self.limit = limit
        self.inflight: list[tuple[str, int, Future]] = []
        self.etags: list[tuple[str, int, str]] = []
        self.bytes = 0

    def put(self, name: str, number: int, data: memoryview, keep: object = None) -> None:
        """Upload part ``number`` of file ``name`` from ``data`` (``keep``: what must live until it is sent)."""
        while len(self.inflight) >= self.limit:
            self._settle(self.inflight.pop(0))
        fut = self.pool.submit(self._send, name, number, data, keep)
        self.inflight.append((name, number, fut))

    def _send(self, name: str, number: int, data: memoryview, keep: object) -> str:
        etag = objstore.upload_part(self.loc, name, self.ids[name], number, _View(data))
        self.bytes += len(data)
        return etag

    def _settle(self, item: tuple[str, int, Future]) -> None:
        name, number, fut = item
        self.etags.append((name, number, fut.result()))

    def finish(self) -> None:
        try:
            while self.inflight:
                self._settle(self.inflight.pop(0))
        finally:
            for _, _, fut in self.inflight:
                fut.cancel()
            self.pool.shutdown(wait=True)


def write(
    g: Group,
    parts: Parts,
    data: list[torch.Tensor],
    ids: Mapping[str, str],
    loc: objstore.Location,
    threads: int,
    budget: int,
    checksums: bool,
) -> tuple[list[tuple[str, int, int | None]], list[tuple[str, int, str]]]:
    """This rank's share of the save: the shared parts in rounds (collective), then the parts only this rank
    holds (``data``: the bytes of this rank's pieces, :func:`bytes_of`). Returns its tally rows
    ``(tensor, bytes, CRC share)`` and the ETags of the parts it uploaded."""
    me = g.rank
    tally = _tally(parts.pieces[me], data, checksums)
    largest = max((f.part for f in parts.files), default=1)
    per_round = max(1, budget // (2 * largest))  # the parts it owns in a round, and what it sends: ~budget
    up = Uploader(loc, ids, threads, max(2, threads))  # plus a part per upload thread in flight
    errors = FirstError()
    try:
        for keys in parts.rounds(per_round):
            received = _exchange(g, parts, keys, data)
            for key in keys:
                if parts.owner[key] == me:
                    buf = _assemble(parts, key, data, received)
                    errors.attempt(up.put, parts.files[key[0]].name, key[1] + 1, engine.as_bytes(buf), buf)
        for key in parts.own(me):
            view, keep = _direct(parts, key, data, me) or _assembled(parts, key, data)
            errors.attempt(up.put, parts.files[key[0]].name, key[1] + 1, view, keep)
    finally:
        errors.always(up.finish)
    errors.raise_first()
    return tally, up.etags


def _direct(parts: Parts, key: tuple[int, int], data: list[torch.Tensor], me: int):
    """A part that lies inside one run of one of this rank's chunks (past the header): ``(view, keep)``, a view of
    that chunk's memory, uploaded without a copy. None otherwise."""
    fp = parts.files[key[0]]
    a, b = fp.bounds(key[1])
    if a < len(fp.header):
        return None
    mine = parts.clips(me, key)
    if len(mine) != 1 or mine[0][1].nbytes != b - a or len(mine[0][1].starts) != 1:
        return None
    i, clip = mine[0]
    return engine.as_bytes(data[i][clip.d0 : clip.d1]), data[i]


def _assembled(parts: Parts, key: tuple[int, int], data: list[torch.Tensor]):
    buf = _assemble(parts, key, data, {})
    return engine.as_bytes(buf), buf


def _assemble(
    parts: Parts, key: tuple[int, int], data: list[torch.Tensor], received: dict[tuple[int, int, int], torch.Tensor]
) -> torch.Tensor:
    """Part ``key`` in a fresh buffer: the header where it falls, this rank's clips, the received ones."""
    fi, k = key
    fp = parts.files[fi]
    a, b = fp.bounds(k)
    buf = torch.empty(b - a, dtype=torch.uint8)
    if a < len(fp.header):
        h = fp.header[a : min(b, len(fp.header))]
        buf[: len(h)].copy_(torch.frombuffer(bytearray(h), dtype=torch.uint8))
    owner = parts.owner[key]
    for rank in parts.holders[key]:
        for i, clip in parts.clips(rank, key):
            if rank == owner:
                src = data[i][clip.d0 : clip.d1]
            else:
                src, received[(rank, fi, k)] = (
                    received[(rank, fi, k)][: clip.nbytes],
                    received[(rank, fi, k)][clip.nbytes :],
                )
            clip.scatter(buf, src)
    return buf


def _exchange(
    g: Group, parts: Parts, keys: list[tuple[int, int]], data: list[torch.Tensor]
) -> dict[tuple[int, int, int], torch.Tensor]:
    """One ``all_to_all``: this rank's bytes of the round's parts go to their owners; returns what the others
    sent this rank, by ``(sender, file index, part)``, each in the sender's piece order."""
    me, n = g.rank, g.size
    send: list[list[torch.Tensor]] = [[] for _ in range(n)]
    expect: list[list[tuple[tuple[int, int, int], int]]] = [[] for _ in range(n)]
    for key in keys:
        owner = parts.owner[key]
        for rank in parts.holders[key]:
            if rank == owner:
                continue
            if rank == me:
                send[owner] += [data[i][c.d0 : c.d1] for i, c in parts.clips(me, key)]
            if owner == me:
                expect[rank].append(((rank, key[0], key[1]), sum(c.nbytes for _, c in parts.clips(rank, key))))
    in_splits = [sum(t.numel() for t in s) for s in send]
    out_splits = [sum(nb for _, nb in e) for e in expect]
    flat_in = torch.cat([t for s in send for t in s]) if sum(in_splits) else torch.empty(0, dtype=torch.uint8)
    flat_out = torch.empty(sum(out_splits), dtype=torch.uint8)
    _all_to_all(g, flat_out, flat_in, out_splits, in_splits)
    out: dict[tuple[int, int, int], torch.Tensor] = {}
    pos = 0
    for rank in range(n):
        for who, nb in expect[rank]:
            out[who] = flat_out[pos : pos + nb]
            pos += nb
    return out


def _all_to_all(g: Group, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
    if not g.on:
        return
    if dist.get_backend(g.group) == "nccl":  # NCCL moves device memory: through the current CUDA device
        dev = torch.device("cuda", torch.cuda.current_device())
        dout = torch.empty_like(out, device=dev)
        dist.all_to_all_single(dout, inp.to(dev), out_splits, in_splits, group=g.group)
        out.copy_(dout)
        return
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=g.group)


def _tally(pieces: list[Piece], data: list[torch.Tensor], checksums: bool) -> list[tuple[str, int, int | None]]:
    """Per piece: its tensor, its bytes and its CRC-32 share (rows of the local path's ``Tally``)."""
    rows = []
    for p, d in zip(pieces, data):
        crc = None
        if checksums:
            starts, run = _runs(p.box, p.shape)
            acc = checksum.Accumulator()
            acc.add_runs(engine.as_bytes(d), (starts * p.itemsize).tolist(), run * p.itemsize)
            crc = acc.contribution(math.prod(p.shape) * p.itemsize)
        rows.append((p.fqn, d.numel(), crc))
    return rows


# -- publish -----------------------------------------------------------------------------------------


def complete(session: Session, parts: Parts, etags: Iterable[tuple[str, int, str]]) -> dict[str, str]:
    """Check every part of every file was uploaded exactly once, then commit: the old index first when
    overwriting (a reader then sees no checkpoint, never a mixed one), every upload completed, files of the
    old layout that the new one lacks deleted. The caller writes the extra files and the index after."""
    got: dict[str, dict[int, str]] = {}
    for name, number, etag in etags:
        got.setdefault(name, {})[number] = etag
    for fp in parts.files:
        have = got.get(fp.name, {})
        if sorted(have) != list(range(1, fp.count + 1)):
            lacking = sorted(set(range(1, fp.count + 1)) - set(have))
            raise HFStorageError(
                f"{fp.name}: parts {lacking[:20]} of {fp.count} were not uploaded; nothing was published"
            )
    loc = session.loc
    if session.had_index:
        objstore.delete(loc, INDEX_NAME)

    def finish(fp: FilePlan) -> str:
        return objstore.complete_upload(
            loc, fp.name, session.uploads[fp.name], [got[fp.name][i + 1] for i in range(fp.count)]
        )

    with ThreadPoolExecutor(min(16, max(1, len(parts.files))), thread_name_prefix="hf_storage-complete") as ex:
        done = dict(zip((fp.name for fp in parts.files), ex.map(finish, parts.files)))  # the store joins them at once
    session.uploads = {}
    if session.had_index:
        names = {fp.name for fp in parts.files}
        for stale in objstore.listing(loc):
            if stale.endswith(".safetensors") and stale not in names:
                objstore.delete(loc, stale)
    return done


def publish(session: Session, index: dict, extra: Mapping[str, bytes | str] | None) -> None:
    """The extra files, then the index (the commit point); then the lock is released."""
    from .publish import check_name

    for name, data in (extra or {}).items():
        check_name(name)
        objstore.put_bytes(session.loc, name, data.encode() if isinstance(data, str) else data)
    objstore.put_bytes(session.loc, INDEX_NAME, json.dumps(index, indent=2).encode() + b"\n")
    session.lease.release()
