"""Node-local row assembly: column shards become whole rows in shared memory, then large ``pwrite``s.

A column shard (tensor parallel, ``Shard(1)``) owns one short run per row of its tensor. Written by its own
rank, that costs a system call (or a page fault) per row, and every page of the file is touched by every
rank that owns a slice of it. When all the ranks owning a band of rows run on one node, they instead copy
their slices into a shared-memory *slot* (a file in ``/dev/shm``) where the band's rows lie whole, meet at a
barrier, and each writes an equal share of the slot to the checkpoint with large ``pwrite``s. Every byte
still reaches the file once, written by one rank; the node holds two slots (``2 x slot`` bytes) in all.

The schedule is a pure function of the boxes of a node's ranks (with where their tensors lie in the
files). Those ranks leave their boxes in small files beside the slots and each computes the same schedule
from them, so planning is node-local and never grows with the world. Ranks step through it in lock-step,
one barrier per round (the same count everywhere); the two slots alternate, so a rank fills round k+1 while its writes of round k run. Bands whose
owners span nodes, rows longer than a slot, and ranks without usable shared memory keep the direct path.
The slots outlive a save: each process keeps its mapping (the file itself is unlinked once every rank
has mapped it), and the next save on the same ranks reuses it, so the pages are set up once per job, not
once per save. A rank that fails mid-way still takes part in every barrier (its peers would otherwise wait for it until
the timeout) and reports its error afterwards; the save then publishes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import socket
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import _io, checksum

SLOT_MAX = 32 * 2**20  # bytes per slot; the node maps two
_HEADROOM = 4  # use /dev/shm only if it has room for this many times the two slots
_ALIGN = 64  # bands start on this boundary in a slot, so any dtype can view them


class Box(NamedTuple):
    """A rank's box of a tensor, with where the tensor lives: all the planner needs to know about it."""

    fqn: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    shape: tuple[int, ...]  # the whole tensor's
    itemsize: int
    file: str
    base: int  # absolute offset of the tensor's first byte in ``file``


def enabled() -> bool:
    """Row assembly is on unless ``HF_STORAGE_EXCHANGE=0``."""
    return os.environ.get("HF_STORAGE_EXCHANGE", "1") != "0"


def shm_dir() -> str:
    return os.environ.get("HF_STORAGE_SHM_DIR", "/dev/shm")


def slot_size(budget: int) -> int:
    """Half the staging budget, at most :data:`SLOT_MAX`, a multiple of the alignment."""
    return max(_ALIGN, min(SLOT_MAX, budget // 2) // _ALIGN * _ALIGN)


def node_key(slot: int) -> tuple | None:
    """Identifies the shared-memory filesystem this process sees (host name and the directory's device and
    inode: two containers on one host with separate ``/dev/shm`` differ). None when it is not writable or has
    room for fewer than four times the two slots (NCCL and others need ``/dev/shm`` too: a container's
    default 64 MB is left alone), unless this process already maps slots of this size."""
    d = shm_dir()
    try:
        st, vfs = os.stat(d), os.statvfs(d)
    except OSError:
        return None
    kept = held()
    roomy = vfs.f_bavail * vfs.f_frsize >= _HEADROOM * 2 * slot or (kept is not None and kept[1] == slot)
    if not os.access(d, os.W_OK) or not roomy:
        return None
    return (socket.gethostname(), st.st_dev, st.st_ino)


_held: dict[str, _Slots] = {}  # token -> this process's mapping of the node's slots, kept for the next save


def held() -> tuple[str, int] | None:
    """``(token, slot size)`` of the slots this process still maps from an earlier save, if any."""
    for token, slots in _held.items():
        return token, slots.slot
    return None


def release() -> None:
    """Unmap the slots kept from earlier saves (they are also released when the process exits)."""
    for slots in _held.values():
        slots.close()
    _held.clear()


def wants(shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...], itemsize: int) -> bool:
    """True for a box of many short runs (a column shard): the boxes the exchange can assemble."""
    if len(shape) < 2 or 0 in sizes or _io.single_run(shape, offsets, sizes) is not None:
        return False
    k = len(shape) - 1
    while sizes[k] == shape[k]:
        k -= 1
    return sizes[k] * math.prod(shape[k + 1:]) * itemsize < _io.SMALL_RUN


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
    """One rank's part of the exchange. ``rounds`` is the same on every rank (the number of barriers)."""

    rounds: int = 0
    slot: int = 0
    token: str = ""
    copies: tuple[Copy, ...] = ()
    writes: tuple[Write, ...] = ()
    bands: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)  # fqn -> box rows handed over
    error: str = ""  # planning failed here: the rank still takes part in every barrier, then raises this


class _Band(NamedTuple):
    file: str
    offset: int  # absolute file offset of the band's first row
    fqn: str
    lo: int  # global rows [lo, hi)
    hi: int
    row_bytes: int
    tensor_nbytes: int
    owners: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]  # (rank, offsets, sizes)


def _bands(owners: Mapping[str, list], nodes: Sequence, slot: int) -> list[_Band]:
    """Bands of whole rows whose owners cover them exactly, all on one node; at most a slot each."""
    out = []
    for fqn, boxes in owners.items():
        b0 = boxes[0][1]
        shape = b0.shape
        if len(shape) < 2 or any((b.shape, b.itemsize, b.file, b.base) != (shape, b0.itemsize, b0.file, b0.base)
                                 or len(b.offsets) != len(shape) for _, b in boxes):
            continue  # ranks disagree about the tensor: the layout fingerprint check reports it
        inner = math.prod(shape[1:])
        row_bytes = inner * b0.itemsize
        if row_bytes == 0 or row_bytes > slot:
            continue
        cuts = sorted({0, shape[0], *(min(b.offsets[0], shape[0]) for _, b in boxes),
                       *(min(b.offsets[0] + b.sizes[0], shape[0]) for _, b in boxes)})
        for lo, hi in zip(cuts, cuts[1:]):
            band = tuple((r, b.offsets, b.sizes) for r, b in boxes
                         if b.offsets[0] <= lo and hi <= b.offsets[0] + b.sizes[0])
            if not band or len({nodes[r] for r, _, _ in band}) != 1:
                continue
            if sum(math.prod(z[1:]) for _, _, z in band) != inner:
                continue  # not covered exactly by these boxes: each rank writes its own part
            step = slot // row_bytes
            for x in range(lo, hi, step):
                y = min(hi, x + step)
                out.append(_Band(b0.file, b0.base + x * row_bytes, fqn, x, y, row_bytes,
                                 math.prod(shape) * b0.itemsize, band))
    out.sort(key=lambda b: (b.file, b.offset))
    return out


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
        used += -(-n // _ALIGN) * _ALIGN
    return rounds


def plan_exchange(boxes: Sequence[Sequence[Box]], nodes: Sequence[object], slot: int,
                  token: str = "", kept: Sequence[tuple[str, int] | None] | None = None) -> list[Schedule]:
    """Every rank's schedule. ``boxes[r]``: rank r's boxes that :func:`wants`; ``nodes[r]``: its :func:`node_key`;
    ``kept[r]``: its :func:`held` slots. ``token`` names fresh slots.

    Each round's bytes on a node are split evenly over the ranks that own a band of that round on that node.
    A node whose ranks in the exchange all still map the same slots (of this size) reuses them.
    """
    world = len(boxes)
    owners: dict[str, list] = defaultdict(list)
    for r, mine in enumerate(boxes):
        if nodes[r] is not None:
            for b in mine:
                owners[b.fqn].append((r, b))
    rounds = _pack(_bands(owners, nodes, slot), slot)
    copies: list[list[Copy]] = [[] for _ in range(world)]
    writes: list[list[Write]] = [[] for _ in range(world)]
    handed: list[dict[str, list[tuple[int, int]]]] = [defaultdict(list) for _ in range(world)]
    for k, members in enumerate(rounds):
        per_node: dict[tuple, list[tuple[int, _Band]]] = defaultdict(list)
        for buf, b in members:
            for r, off, _ in b.owners:
                copies[r].append(Copy(k, b.fqn, b.lo - off[0], b.hi - b.lo, buf))
                _extend(handed[r][b.fqn], b.lo - off[0], b.hi - off[0])
            per_node[nodes[b.owners[0][0]]].append((buf, b))
        for items in per_node.values():
            _split_writes(k, items, writes)
    tokens = _node_tokens(nodes, copies, writes, kept or [None] * world, slot, token)
    return [Schedule(len(rounds), slot, tokens.get(nodes[r], ""), tuple(copies[r]), tuple(writes[r]),
                     {f: tuple(v) for f, v in handed[r].items()}) for r in range(world)]


def _node_tokens(nodes, copies, writes, kept, slot: int, fresh: str) -> dict:
    """Per node: the slots its ranks in the exchange already share, else ``fresh`` ones."""
    members: dict[tuple, set] = defaultdict(set)
    for r, node in enumerate(nodes):
        if copies[r] or writes[r]:
            members[node].add(kept[r] if kept[r] is not None and kept[r][1] == slot else None)
    return {node: next(iter(held))[0] if len(held) == 1 and None not in held else fresh
            for node, held in members.items()}


def arrange(rank: int, world: int, mates: Sequence[int], mine: Sequence[Box], token: str, slot: int,
            barrier: Callable[[], None], all_gather: Callable[[object], list]) -> Schedule:
    """This rank's schedule, planned from its node only: the ranks in ``mates`` (this one included, all on
    this node and holding boxes that :func:`wants`; empty when this rank takes no part) leave their boxes
    and kept slots in small files beside the slots, meet at one barrier, and each plans the node's
    schedule from those files. One all-gather of round counts then gives every rank the same number of
    barriers. Every rank of the save calls this (two collectives), so planning never grows with the world.
    """
    def path(r: int) -> str:
        return os.path.join(shm_dir(), f"hf_storage-{token}.{r}.json")

    sched, error = Schedule(slot=slot, token=token), ""
    if mates:
        try:
            with open(path(rank), "w") as f:
                json.dump({"held": held(), "boxes": [list(b) for b in mine]}, f)
        except OSError as e:
            error = f"writing {path(rank)}: {e}"
    barrier()
    if mates and not error:
        try:
            facts = {}
            for r in mates:
                with open(path(r)) as f:
                    facts[r] = json.load(f)
            boxes: list[list] = [[] for _ in range(world)]
            nodes: list = [None] * world
            kept: list = [None] * world
            for r, fact in facts.items():
                boxes[r] = [Box(fqn, tuple(o), tuple(z), tuple(sh), it, f, base)
                            for fqn, o, z, sh, it, f, base in fact["boxes"]]
                nodes[r] = "this node"
                kept[r] = tuple(fact["held"]) if fact["held"] else None
            sched = plan_exchange(boxes, nodes, slot, token, kept)[rank]
        except (OSError, ValueError, KeyError, TypeError) as e:
            error = f"reading the boxes of the ranks on this node: {e}"
    rounds = max(all_gather(sched.rounds))  # after it, every mate has read every file
    if mates:
        try:
            os.unlink(path(rank))
        except OSError:
            pass
    if error:
        return Schedule(rounds, slot, token, error=error + "; set HF_STORAGE_EXCHANGE=0 to write column shards directly")
    return dataclasses.replace(sched, rounds=rounds)


def _extend(ranges: list[tuple[int, int]], lo: int, hi: int) -> None:
    if ranges and ranges[-1][1] == lo:
        ranges[-1] = (ranges[-1][0], hi)
    else:
        ranges.append((lo, hi))


def _split_writes(k: int, items: list[tuple[int, _Band]], writes: list[list[Write]]) -> None:
    """One node's bands of round ``k``: their bytes, in slot order, cut into one equal share per owner rank."""
    ranks = sorted({r for _, b in items for r, _, _ in b.owners})
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
                Write(k, b.fqn, b.file, buf + pos, b.offset + pos, b.lo * b.row_bytes + pos, take, b.tensor_nbytes))
            pos += take
            cursor += take


def direct_parts(sizes: tuple[int, ...], handed: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Row ranges of a box (``(first, count)``) that were not handed to the exchange."""
    out, at = [], 0
    for lo, hi in sorted(handed):
        if lo > at:
            out.append((at, lo - at))
        at = max(at, hi)
    if at < sizes[0]:
        out.append((at, sizes[0] - at))
    return out


class _Slots:
    """The node's two slots: a shared mapping of one ``/dev/shm`` file, its blocks reserved up front (a
    full tmpfs is then an error here, not a SIGBUS later)."""

    def __init__(self, token: str, slot: int):
        self.path = os.path.join(shm_dir(), f"hf_storage-{token}")
        self.slot = slot
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not _io.preallocate(fd, 2 * slot):
                os.ftruncate(fd, 2 * slot)
            # populated: the pages are mapped in one call, not faulted in one at a time by each copy
            self._map = mmap.mmap(fd, 2 * slot, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        self.buf = torch.frombuffer(self._map, dtype=torch.uint8)
        self.bytes = memoryview(self._map)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def view(self, k: int, buf: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        at = (k % 2) * self.slot + buf
        return self.buf[at:at + nbytes].view(dtype)

    def close(self) -> None:
        del self.buf
        self.bytes.release()
        try:
            self._map.close()
        except BufferError:  # a view is still referenced somewhere: the mapping goes with it
            pass


@dataclass
class Exchange:
    """Runs a :class:`Schedule` on this rank; ``barrier`` synchronises every rank of the save."""

    schedule: Schedule
    barrier: Callable[[], None]

    @property
    def bands(self) -> Mapping[str, tuple[tuple[int, int], ...]]:
        return self.schedule.bands

    def run(self, chunks: Mapping[str, object], fd_of: Callable[[str], int], threads: int, checksums: bool,
            failed: bool = False, progress: Callable[[int], None] | None = None) -> list:
        """Copy this rank's bands in, write its shares out, round by round. Returns ``ChunkResult``s for the
        bytes it wrote; raises its first local error only after the last barrier."""
        from .writer import ChunkResult

        s = self.schedule
        error: BaseException | None = OSError(s.error) if s.error else None  # the caller names this rank
        slots, fresh = None, False
        if not failed and error is None and (s.copies or s.writes):
            slots = _held.get(s.token)
            if slots is None:
                release()
                try:
                    slots, fresh = _Slots(s.token, s.slot), True
                    _held[s.token] = slots
                except Exception as e:
                    error = OSError(f"shared memory for assembling column shards ({shm_dir()}): {e}; "
                                    "set HF_STORAGE_EXCHANGE=0 to write them directly")
        copies = _by_round(s.copies, s.rounds)
        writes = _by_round(s.writes, s.rounds)
        written: dict[str, list] = {}
        try:
            with _io.IOPool(threads) as pool:
                for k in range(s.rounds):
                    if error is None and not failed and slots is not None:
                        try:
                            for c in copies[k]:
                                n = _copy_in(slots, k, c, chunks[c.fqn])
                                if progress is not None:
                                    progress(n)  # this rank's own bytes, as for the ones it writes directly
                        except Exception as e:
                            error = e
                    try:
                        pool.drain()  # this rank's writes of round k-1: the slot they read is refilled next
                    except Exception as e:
                        error = error or e
                    self.barrier()
                    if k == 0 and fresh:
                        slots.unlink()  # every rank mapped it before the first barrier: the name can go
                    if error is None and not failed and slots is not None:
                        try:
                            _write_out(pool, slots, k, writes[k], fd_of, written, checksums)
                        except Exception as e:
                            error = e
                try:
                    pool.drain()
                except Exception as e:
                    error = error or e
        finally:
            if fresh:
                slots.unlink()
        if error is not None:
            raise error
        return [ChunkResult(fqn, n, None if acc is None else acc.contribution(total))
                for fqn, (n, acc, total) in written.items()]


def _by_round(items, rounds: int) -> list[list]:
    out: list[list] = [[] for _ in range(rounds)]
    for it in items:
        out[it.round].append(it)
    return out


def _copy_in(slots: _Slots, k: int, c: Copy, chunk) -> int:
    data = chunk.data
    rest = tuple(chunk.shape[1:])
    band = slots.view(k, c.buf, c.rows * math.prod(rest) * data.element_size(), data.dtype).view(c.rows, *rest)
    for d in range(1, len(chunk.shape)):
        band = band.narrow(d, chunk.offsets[d], chunk.sizes[d])
    src = data.narrow(0, c.row0, c.rows)
    band.copy_(src)
    return src.numel() * src.element_size()


def _write_out(pool: _io.IOPool, slots: _Slots, k: int, ops: list[Write], fd_of, written: dict,
               checksums: bool) -> None:
    """Submit this rank's shares of round ``k``; fold them into ``written`` (bytes, CRC) meanwhile."""
    base = (k % 2) * slots.slot
    for w in ops:
        pool.submit(_io.pwrite_all, fd_of(w.file), [(slots.bytes[base + w.buf:base + w.buf + w.nbytes], w.offset)])
    for w in ops:  # checksums on this thread while the I/O threads write
        entry = written.get(w.fqn)
        if entry is None:
            entry = written[w.fqn] = [0, checksum.Accumulator() if checksums else None, w.tensor_nbytes]
        entry[0] += w.nbytes
        if entry[1] is not None:
            entry[1].add_runs(slots.bytes[base + w.buf:base + w.buf + w.nbytes], [w.start], w.nbytes)
