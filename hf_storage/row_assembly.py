"""Node-local row assembly: column shards become whole rows in shared memory, then large ``pwrite``s.

A column shard (tensor parallel, ``Shard(1)``) owns one short run per row of its tensor. Written by its own
rank, that costs a system call (or a page fault) per row, and every page of the file is touched by every
rank that owns a slice of it. When all the ranks owning a band of rows run on one node, they instead copy
their slices into a shared *slot* where the band's rows lie whole, meet, and each writes an equal share of
the slot to the checkpoint with large ``pwrite``s. Every byte still reaches the file once, written by one
rank; the node holds two slots (``2 x slot`` bytes) in all, which alternate, so a rank fills round k+1
while its writes of round k run.

Nothing here is a collective and nothing has a name in ``/dev/shm``. Each rank of a save that takes part
opens a *desk*: an anonymous ``memfd`` holding its parts (what it owns, where the tensors lie) and one
control word (rounds passed, or failed). The ranks learn each other's ``(node, pid, desk fd, slots fd)``
from the save's own messages (:class:`Seat`), open each other's memfds through ``/proc/<pid>/fd``, plan the
node's schedule from the parts (a pure function, the same on every rank of the node), and meet by polling
the control words. A rank that fails marks itself failed and its node mates stop waiting for it; a rank
that dies is seen dead by its pid. Memory goes with the last process that holds it: a killed save leaves
nothing behind. The slots of a process persist across saves, so their pages are set up once per job.

An async save *stages* into the rows instead (:func:`join` with ``staged=True``): the node's host rank holds
one buffer with room for every band of the node (the node's column shards, once), the ranks copy their shards
straight into their positions there while training waits (device-to-host as one 2-D copy per band on CUDA),
and the background part only writes. The buffer is kept for the next save of the same state.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

import numpy as np
import torch

from . import checksum, engine, settings
from .box import Box
from .errors import HFStorageError, PeerFailure

SLOT_MAX = 32 * 2**20  # bytes per slot; the node's host maps two
_ALIGN = 64  # bands start on this boundary in a slot, so any dtype can view them
_FAILED = 2**62  # a control word: this rank gave up; nobody waits for it
_DESK_DATA = 4096  # parts JSON starts here; the control word is at 0, the staged rows' fd and inode at 8
_UNBOUNDED = 2**62  # a slot size for one round holding every band (staged rows)
_DEFAULT_TIMEOUT = timedelta(minutes=10)


class Part(NamedTuple):
    """A rank's box of a tensor, with where the tensor lives: all the planner needs to know about it."""

    fqn: str
    box: Box
    shape: tuple[int, ...]  # the whole tensor's
    itemsize: int
    file: str
    base: int  # absolute offset of the tensor's first byte in ``file``


class Seat(NamedTuple):
    """How a rank's node mates reach it: its node, pid, desk and slots memfds."""

    node: str
    pid: int
    desk: int
    slots: int


def slot_size(budget: int) -> int:
    """Half the host-buffer budget, at most :data:`SLOT_MAX`, a multiple of the alignment."""
    return max(_ALIGN, min(SLOT_MAX, budget // 2) // _ALIGN * _ALIGN)


def wanted(shape: tuple[int, ...], box: Box, itemsize: int) -> bool:
    """True for a box of many short runs (a column shard): the boxes row assembly can take."""
    return box.short_runs(shape, itemsize, engine.SMALL_RUN)


def node_name() -> str | None:
    """Who can share memory with whom: host name, kernel PID namespace (``/proc/<pid>/fd`` must reach the
    mates) and user. None where row assembly cannot run (turned off, no memfd or no ``/proc``)."""
    if not settings.row_assembly() or not hasattr(os, "memfd_create"):
        return None
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{settings.node() or socket.gethostname()}/{ns}/{os.getuid()}"


# -- the schedule, as data ----------------------------------------------------------------------


class Copy(NamedTuple):
    """Rows ``[row0, row0 + rows)`` of this rank's box of ``fqn`` go into the slot at byte ``buf``."""

    round: int
    fqn: str
    row0: int
    rows: int
    buf: int  # where the band's first row starts in the slot (the box's columns lie inside each row)


class Write(NamedTuple):
    """Slot bytes ``[buf, buf + nbytes)`` go to ``file`` at ``offset``: tensor bytes from ``start``."""

    round: int
    fqn: str
    file: str
    buf: int
    offset: int
    start: int
    nbytes: int
    tensor_nbytes: int


@dataclass(frozen=True)
class Schedule:
    """One rank's part of its node's row assembly; ``rounds`` is the same on every rank of the node."""

    rounds: int = 0
    slot: int = 0
    copies: tuple[Copy, ...] = ()
    writes: tuple[Write, ...] = ()
    bands: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)  # fqn -> box rows handed over


class _Band(NamedTuple):
    file: str
    offset: int  # absolute file offset of the band's first row
    fqn: str
    lo: int  # global rows [lo, hi)
    hi: int
    row_bytes: int
    tensor_nbytes: int
    owners: tuple[tuple[int, Box], ...]  # (rank, box)


def _bands(owners: Mapping[str, list[tuple[int, Part]]], nodes: Sequence, slot: int) -> list[_Band]:
    """Bands of whole rows whose owners cover them exactly, all on one node; at most a slot each."""
    out = []
    for fqn, parts in owners.items():
        p0 = parts[0][1]
        shape = p0.shape
        same = all((p.shape, p.itemsize, p.file, p.base) == (shape, p0.itemsize, p0.file, p0.base) for _, p in parts)
        row_bytes = math.prod(shape[1:]) * p0.itemsize
        if len(shape) < 2 or not same or row_bytes == 0 or row_bytes > slot:
            continue  # ranks disagreeing about the tensor are caught by the layout fingerprint
        for lo, hi in _cuts(shape[0], [p.box for _, p in parts]):
            band = tuple(
                (r, p.box) for r, p in parts if p.box.offsets[0] <= lo and hi <= p.box.offsets[0] + p.box.sizes[0]
            )
            if not band or len({nodes[r] for r, _ in band}) != 1:
                continue
            if sum(math.prod(b.sizes[1:]) for _, b in band) != math.prod(shape[1:]):
                continue  # not covered exactly by these boxes: each rank writes its own part
            step = slot // row_bytes
            for x in range(lo, hi, step):
                y = min(hi, x + step)
                out.append(
                    _Band(p0.file, p0.base + x * row_bytes, fqn, x, y, row_bytes, math.prod(shape) * p0.itemsize, band)
                )
    out.sort(key=lambda b: (b.file, b.offset))
    return out


def _cuts(rows: int, boxes: list[Box]) -> list[tuple[int, int]]:
    edges = {0, rows}
    for b in boxes:
        edges |= {min(b.offsets[0], rows), min(b.offsets[0] + b.sizes[0], rows)}
    cuts = sorted(edges)
    return list(zip(cuts, cuts[1:]))


def _pack(bands: list[_Band], slot: int) -> list[list[tuple[int, _Band]]]:
    """Bands into rounds of at most ``slot`` bytes, in file order: ``[(slot offset, band), ...]`` per round."""
    rounds: list[list[tuple[int, _Band]]] = []
    used = slot + 1
    for b in bands:
        n = (b.hi - b.lo) * b.row_bytes
        if used + n > slot:
            rounds.append([])
            used = 0
        rounds[-1].append((used, b))
        used += _aligned(n)
    return rounds


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def schedule(parts: Sequence[Sequence[Part]], nodes: Sequence[object], slot: int | None) -> list[Schedule]:
    """Every rank's schedule. ``parts[r]``: rank r's parts that :func:`wanted`; ``nodes[r]``: its node (None:
    it takes no part). Each round's bytes on a node are split evenly over the ranks owning a band of it.
    ``slot`` None: one round with room for every band (its size is the schedule's ``slot``)."""
    world = len(parts)
    owners: dict[str, list[tuple[int, Part]]] = defaultdict(list)
    for r, mine in enumerate(parts):
        if nodes[r] is not None:
            for p in mine:
                owners[p.fqn].append((r, p))
    bands = _bands(owners, nodes, slot or _UNBOUNDED)
    if slot is None:
        slot = max(_ALIGN, sum(_aligned((b.hi - b.lo) * b.row_bytes) for b in bands))
    rounds = _pack(bands, slot)
    copies: list[list[Copy]] = [[] for _ in range(world)]
    writes: list[list[Write]] = [[] for _ in range(world)]
    handed: list[dict[str, list[tuple[int, int]]]] = [defaultdict(list) for _ in range(world)]
    for k, members in enumerate(rounds):
        per_node: dict[object, list[tuple[int, _Band]]] = defaultdict(list)
        for buf, b in members:
            for r, box in b.owners:
                copies[r].append(Copy(k, b.fqn, b.lo - box.offsets[0], b.hi - b.lo, buf))
                _extend(handed[r][b.fqn], b.lo - box.offsets[0], b.hi - box.offsets[0])
            per_node[nodes[b.owners[0][0]]].append((buf, b))
        for items in per_node.values():
            _split_writes(k, items, writes)
    return [
        Schedule(len(rounds), slot, tuple(copies[r]), tuple(writes[r]), {f: tuple(v) for f, v in handed[r].items()})
        for r in range(world)
    ]


def _extend(ranges: list[tuple[int, int]], lo: int, hi: int) -> None:
    if ranges and ranges[-1][1] == lo:
        ranges[-1] = (ranges[-1][0], hi)
    else:
        ranges.append((lo, hi))


def _split_writes(k: int, items: list[tuple[int, _Band]], writes: list[list[Write]]) -> None:
    """One node's bands of round ``k``: their bytes, in slot order, cut into one equal share per owner rank."""
    ranks = sorted({r for _, b in items for r, _ in b.owners})
    total = sum((b.hi - b.lo) * b.row_bytes for _, b in items)
    share = -(-total // len(ranks))
    if share > 16 * 4096:  # large shares in whole pages: the writers of a round meet at page boundaries
        share = -(-share // 4096) * 4096
    cursor = 0
    for buf, b in items:
        n, pos = (b.hi - b.lo) * b.row_bytes, 0
        while pos < n:
            who = cursor // share
            take = min(n - pos, (who + 1) * share - cursor)
            writes[ranks[who]].append(
                Write(k, b.fqn, b.file, buf + pos, b.offset + pos, b.lo * b.row_bytes + pos, take, b.tensor_nbytes)
            )
            pos += take
            cursor += take


def direct_rows(rows: int, handed: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Row ranges of a box (``(first, count)``) that were not handed to row assembly."""
    out, at = [], 0
    for lo, hi in sorted(handed):
        if lo > at:
            out.append((at, lo - at))
        at = max(at, hi)
    if at < rows:
        out.append((at, rows - at))
    return out


# -- shared memory between the ranks of a node -----------------------------------------------------


class _Memfd:
    """An anonymous shared memory file of this process, or one of a mate's opened through ``/proc``."""

    def __init__(self, size: int, at: tuple[int, int] | None = None):
        """A new memfd of ``size`` bytes, or ``at = (pid, fd)``: that process's, opened here."""
        if at is None:
            self.fd = os.memfd_create("hf_storage", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
        else:
            self.fd = os.open(f"/proc/{at[0]}/fd/{at[1]}", os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Slots:
    """This process's ``count`` slots (two that alternate; one for staged rows): a memfd mapped shared; the node's
    host reserves its pages before use."""

    def __init__(self, slot: int, at: tuple[int, int] | None = None, count: int = 2):
        """New slots, or ``at = (pid, fd)``: those another process made, mapped here."""
        self.slot, self.count = slot, count
        self.file = _Memfd(count * slot, at)
        self.at = at or (os.getpid(), self.file.fd)  # the process that made it, and its fd there
        self.ino = os.fstat(self.file.fd).st_ino  # which memfd this is, whatever fd number it had
        self._map = mmap.mmap(self.file.fd, count * slot, flags=mmap.MAP_SHARED)
        self.buf = torch.frombuffer(self._map, dtype=torch.uint8)
        self.bytes = memoryview(self._map)
        self.pinned = False

    def reserve(self) -> None:
        """Reserve the pages (a full memory cgroup is then an error here, not a SIGBUS later)."""
        engine.preallocate(self.file.fd, self.count * self.slot)

    def pin(self) -> None:
        """Page-lock the mapping in this process, once: device-to-host copies into it then run at full speed."""
        if not self.pinned:
            torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), self.buf.numel(), 0)
            self.pinned = True

    def view(self, k: int, buf: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        at = (k % self.count) * self.slot + buf
        return self.buf[at : at + nbytes].view(dtype)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
        del self.buf
        self.bytes.release()
        try:
            self._map.close()
        except BufferError:  # a view is still referenced somewhere: the mapping goes with it
            pass
        self.file.close()


_OWN: dict[int, Slots] = {}  # slot size -> this process's slots (kept for the next save)
_MATES: dict[tuple[int, int], Slots] = {}  # (pid, fd) -> a host's slots as mapped here (kept too)
_STAGED: dict[int, Slots] = {}  # pid -> staged rows, this process's own or a host's as mapped here (kept too)


def own_slots(slot: int) -> Slots:
    if slot not in _OWN:
        _OWN[slot] = Slots(slot)
    return _OWN[slot]


def _own_rows(size: int) -> Slots:
    """This process's staged rows of ``size`` bytes: reused while the size repeats, reserved when made."""
    me = os.getpid()
    rows = _STAGED.get(me)
    if rows is None or rows.slot != size:
        if rows is not None:
            rows.close()
        rows = _STAGED[me] = Slots(size, count=1)
        rows.reserve()
    return rows


def _host_rows(pid: int, fd: int, ino: int, size: int) -> Slots:
    """Process ``pid``'s staged rows (its ``fd``, inode ``ino``) as mapped here, mapped anew only when it made
    new ones."""
    if pid == os.getpid():
        return _STAGED[pid]
    rows = _STAGED.pop(pid, None)
    if rows is None or (rows.ino, rows.slot) != (ino, size):
        if rows is not None:
            rows.close()
        rows = Slots(size, (pid, fd), count=1)
        if rows.ino != ino:
            rows.close()
            raise OSError(f"the staged rows of process {pid} were replaced while being opened")
    _STAGED[pid] = rows
    return rows


def release() -> None:
    """Unmap every slot this process keeps (they also go when the process exits)."""
    for s in (*_OWN.values(), *_MATES.values(), *_STAGED.values()):
        s.close()
    _OWN.clear()
    _MATES.clear()
    _STAGED.clear()


class Desk:
    """This rank's desk for one save: its parts for the mates to read, and its control word."""

    def __init__(self, slot: int):
        self.slot = slot
        self.file = _Memfd(_DESK_DATA)
        self.seat = Seat(node_name() or "", os.getpid(), self.file.fd, own_slots(slot).file.fd)

    def post(self, parts: Sequence[Part]) -> None:
        data = json.dumps(
            [[p.fqn, p.box.offsets, p.box.sizes, p.shape, p.itemsize, p.file, p.base] for p in parts]
        ).encode()
        os.ftruncate(self.file.fd, _DESK_DATA + len(data))
        os.pwrite(self.file.fd, data, _DESK_DATA)

    def post_rows(self, rows: Slots) -> None:
        """As the node's host: where the mates find the staged rows."""
        os.pwrite(self.file.fd, np.array([rows.file.fd, rows.ino], dtype=np.int64).tobytes(), 8)

    def close(self) -> None:
        self.file.close()


def _posted_rows(fd: int) -> tuple[int, int]:
    """The staged rows' ``(fd, inode)`` a host posted in its desk ``fd``."""
    rows_fd, ino = np.frombuffer(os.pread(fd, 16, 8), dtype=np.int64).tolist()
    return rows_fd, ino


def _read_parts(fd: int) -> list[Part]:
    size = os.fstat(fd).st_size
    raw = os.pread(fd, size - _DESK_DATA, _DESK_DATA) if size > _DESK_DATA else b"[]"
    return [Part(f, Box(tuple(o), tuple(z)), tuple(sh), it, fl, base) for f, o, z, sh, it, fl, base in json.loads(raw)]


class _Meeting:
    """The node's ranks meet by polling each other's control words (rounds passed, or failed)."""

    def __init__(self, me: int, desk: Desk, mates: Mapping[int, Seat], timeout: timedelta | None):
        self.me, self.desk, self.seats = me, desk, dict(mates)
        self.timeout = (timeout or _DEFAULT_TIMEOUT).total_seconds()
        self.files: dict[int, int] = {}
        for r, seat in self.seats.items():
            self.files[r] = desk.file.fd if r == me else _Memfd(0, (seat.pid, seat.desk)).fd

    def mark(self, value: int) -> None:
        os.pwrite(self.desk.file.fd, np.int64(value).tobytes(), 0)

    def meet(self, k: int) -> None:
        """Arrive at meeting ``k`` and wait for every mate. A mate that failed fails this rank too (the save is
        lost anyway; its own error is the cause); one that died or hangs is a :class:`PeerFailure`."""
        self.mark(k)
        start, pause, checked = time.monotonic(), 0.0, time.monotonic()
        waiting = [r for r in self.files if r != self.me]
        while waiting:
            words = {r: int(np.frombuffer(os.pread(self.files[r], 8, 0), dtype=np.int64)[0]) for r in waiting}
            failed = [r for r, w in words.items() if w == _FAILED]
            if failed:
                raise HFStorageError(f"rank {failed[0]} on this node failed during row assembly")
            waiting = [r for r, w in words.items() if w < k]
            now = time.monotonic()
            if waiting and now - checked > 0.1:
                self._check_alive(waiting, now - start)
                checked = now
            pause = min(0.001, pause * 2 or 0.00002)
            if waiting:
                time.sleep(pause)

    def _check_alive(self, waiting: list[int], waited: float) -> None:
        dead = [r for r in waiting if not _alive(self.seats[r].pid)]
        if dead:
            raise PeerFailure(f"rank {dead[0]} died during row assembly; nothing was published")
        if waited > self.timeout:
            who = f"rank {waiting[0]}" if len(waiting) == 1 else f"ranks {', '.join(map(str, waiting))}"
            raise PeerFailure(
                f"{who} did not reach row assembly round in {self.timeout:.0f} s (stuck in I/O?); nothing was published"
            )

    def close(self) -> None:
        for r, fd in self.files.items():
            if r != self.me:
                os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- running a node's schedule ---------------------------------------------------------------------


@dataclass
class Assembly:
    """This rank's part of its node's row assembly for one save; :meth:`run` after the direct writes start.
    ``staged``: the rows were copied in before, by :meth:`stage`, and :meth:`run` only writes (in this process,
    or in a writer process that :func:`attach` es to the rows: ``meeting`` None there)."""

    meeting: _Meeting | None
    schedule: Schedule
    slots: Slots
    staged: bool = False

    @property
    def bands(self) -> Mapping[str, tuple[tuple[int, int], ...]]:
        return self.schedule.bands

    def stage(self, chunks: Mapping[str, tuple[torch.Tensor, tuple[int, ...], Box]]) -> None:
        """Copy this rank's bands into the staged rows (CUDA: one strided copy per band, one synchronisation),
        then meet the node's ranks: when this returns, every rank's rows are in place."""
        assert self.meeting is not None
        try:
            cuda = any(data.is_cuda for data, _, _ in chunks.values())
            if cuda:
                self.slots.pin()
            for c in self.schedule.copies:
                _copy_in(self.slots, c.round, c, chunks[c.fqn])
            if cuda:
                torch.cuda.synchronize()
            self.meeting.meet(3)
        except BaseException:
            self.meeting.mark(_FAILED)
            raise

    def handoff(self) -> tuple:
        """What a writer process of this node needs to write this rank's shares of the staged rows."""
        rows = self.slots
        return (*rows.at, rows.ino, rows.slot, self.schedule)

    def run(
        self,
        chunks: Mapping[str, object],
        fd_of: Callable[[str], int],
        threads: int,
        checksums: bool,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, list]:
        """Copy this rank's bands in (unless staged), write its shares out, round by round. Returns per tensor
        ``[bytes, CRC share or None]`` of what it wrote. On any error the rank marks itself failed first."""
        s = self.schedule
        copies, writes = _by_round(s.copies, s.rounds), _by_round(s.writes, s.rounds)
        written: dict[str, list] = {}
        try:
            with engine.IOPool(threads) as pool:
                for k in range(s.rounds):
                    for c in copies[k]:
                        n = _copied(c, chunks[c.fqn]) if self.staged else _copy_in(self.slots, k, c, chunks[c.fqn])
                        if progress is not None:
                            progress(n)  # this rank's own bytes, as for the ones it writes directly
                    if not self.staged:  # staged rows met when they were staged
                        pool.drain()  # this rank's writes of round k-1: the slot they read is refilled next
                        self.meeting.meet(k + 2)  # type: ignore[union-attr]
                    _write_out(pool, self.slots, k, writes[k], fd_of, written, checksums)
        except BaseException:
            self.fail()
            raise
        return {f: [n, None if acc is None else acc.contribution(total)] for f, (n, acc, total) in written.items()}

    def fail(self) -> None:
        if self.meeting is not None:
            self.meeting.mark(_FAILED)

    def close(self) -> None:
        if self.meeting is not None:
            self.meeting.close()


def attach(handoff: tuple) -> Assembly:
    """In a writer process of the node: the staged rows a rank's :meth:`Assembly.handoff` describes, to write."""
    owner, fd, ino, size, plan = handoff
    return Assembly(None, plan, _host_rows(owner, fd, ino, size), staged=True)


def join(
    me: int,
    desk: Desk,
    mates: Mapping[int, Seat],
    parts: Sequence[Part],
    timeout: timedelta | None,
    staged: bool = False,
) -> Assembly | None:
    """Post this rank's parts, meet its node mates (``mates``: rank -> seat, this rank included), and plan the
    node's schedule. None when there is nothing to assemble. Marks the desk failed on any error. ``staged``
    (every rank of the node alike): one round in staged rows that the node's host makes, for :meth:`stage`."""
    desk.post(parts)
    meeting = None
    try:
        meeting = _Meeting(me, desk, mates, timeout)
        meeting.meet(1)  # every mate has posted its parts and opened the others' desks (desks start at 0)
        ranks = sorted(mates)
        node_parts = [_parts_of(r, meeting.files[r]) for r in ranks]
        plan = schedule(node_parts, ["node"] * len(ranks), None if staged else desk.slot)[ranks.index(me)]
        if plan.rounds == 0:
            meeting.close()
            return None
        if not staged:
            return Assembly(meeting, plan, _host_slots(me, ranks[0], mates[ranks[0]], desk.slot))
        if me == ranks[0]:
            rows = _own_rows(plan.slot)
            desk.post_rows(rows)
        meeting.meet(2)  # the host's staged rows are there
        if me != ranks[0]:
            rows = _host_rows(mates[ranks[0]].pid, *_posted_rows(meeting.files[ranks[0]]), plan.slot)
        return Assembly(meeting, plan, rows, staged=True)
    except BaseException:
        desk_fail = meeting or _Meeting(me, desk, {me: mates[me]}, timeout)
        desk_fail.mark(_FAILED)
        raise


def _parts_of(rank: int, fd: int) -> list[Part]:
    try:
        return _read_parts(fd)
    except (OSError, ValueError, TypeError) as e:
        raise OSError(
            f"row assembly could not read the parts of rank {rank} on this node ({e}); "
            "set HF_STORAGE_ROW_ASSEMBLY=0 to write column shards directly"
        ) from e


def _host_slots(me: int, host: int, seat: Seat, slot: int) -> Slots:
    """The node's slots, those of its lowest rank (the host), which reserves their pages."""
    if me == host:
        slots = own_slots(slot)
        slots.reserve()
        return slots
    key = (seat.pid, seat.slots)
    if key not in _MATES:
        _MATES[key] = Slots(slot, key)
    return _MATES[key]


def _by_round(items, rounds: int) -> list[list]:
    out: list[list] = [[] for _ in range(rounds)]
    for it in items:
        out[it.round].append(it)
    return out


def _copy_in(slots: Slots, k: int, c: Copy, chunk) -> int:
    data, shape, box = chunk
    rest = tuple(shape[1:])
    band = slots.view(k, c.buf, c.rows * math.prod(rest) * data.element_size(), data.dtype).view(c.rows, *rest)
    for d in range(1, len(shape)):
        band = band.narrow(d, box.offsets[d], box.sizes[d])
    src = data.narrow(0, c.row0, c.rows)
    if not (src.is_cuda and engine.copy_rows_from_device(band, src)):
        band.copy_(src)
    return src.numel() * src.element_size()


def _copied(c: Copy, chunk) -> int:
    """Bytes of copy ``c`` (made when the rows were staged)."""
    data, _, box = chunk
    return c.rows * math.prod(box.sizes[1:]) * data.element_size()


def _write_out(
    pool: engine.IOPool, slots: Slots, k: int, ops: list[Write], fd_of, written: dict, checksums: bool
) -> None:
    """Submit this rank's shares of round ``k``; fold them into ``written`` (bytes, CRC) meanwhile."""
    base = (k % 2) * slots.slot
    for w in ops:
        pool.submit(engine.pwrite_all, fd_of(w.file), [(slots.bytes[base + w.buf : base + w.buf + w.nbytes], w.offset)])
    for w in ops:  # checksums on this thread while the I/O threads write
        entry = written.get(w.fqn)
        if entry is None:
            entry = written[w.fqn] = [0, checksum.Accumulator() if checksums else None, w.tensor_nbytes]
        entry[0] += w.nbytes
        if entry[1] is not None:
            entry[1].add_runs(slots.bytes[base + w.buf : base + w.buf + w.nbytes], [w.start], w.nbytes)
