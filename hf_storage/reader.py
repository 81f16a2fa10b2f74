"""Resharding reader: any Hugging Face safetensors checkpoint into any sharded layout.

Metadata comes from ``model.safetensors.index.json`` and the headers of the files it names (validated
as untrusted input), or from a lone ``model.safetensors``. Directories written by torch's own
``HuggingFaceStorageWriter(save_distributed=True)`` have no index; their ``*.safetensors`` shard files,
each carrying ``DCP_SHARDING_INFO``, are found by listing the directory. Each rank then ``preadv``s only
the byte runs its targets need, straight into the target tensor's memory when it is a contiguous CPU
tensor of the stored dtype, through a bounded staging buffer otherwise.

A checkpoint in an object store (``s3://bucket/prefix``) is read the same way through ranged GETs: the index
and each file's size and ETag (HEAD) when it is opened, each header by ranged reads, then only the bytes each
rank needs, every request pinned to the ETag seen at open (a file replaced meanwhile raises
:class:`~hf_storage.objstore.ObjectChangedError`). See :class:`~hf_storage.engine.RangedReads`.

A tensor this torch build cannot hold (a safetensors dtype it has no type for, such as ``F6_E2M3``) does not
make the checkpoint unreadable: it is listed in :attr:`Checkpoint.blocked` instead of
:attr:`Checkpoint.tensors`, and refused, by name, only when a load targets it.
"""

from __future__ import annotations

import json
import math
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from . import dtypes, engine, header, objstore
from .box import Box
from .errors import CheckpointFormatError, StateDictMismatchError, format_keys
from .layout import INDEX_NAME, SINGLE_FILE_NAME

MAX_INDEX_BYTES = 100 * 1000 * 1000
_MAX_DIM = 2**63 - 1  # torch.Size holds int64
_SHARDING_KEY = "DCP_SHARDING_INFO"


class StoredChunk(NamedTuple):
    """Where one stored piece of a tensor lives: file, absolute data offset, its box in the tensor."""

    file: str
    begin: int
    dtype: torch.dtype
    shape: tuple[int, ...]  # shape of the stored piece
    offsets: tuple[int, ...]  # its offset in the full tensor


class TensorInfo(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # torch shape: for packed dtypes (float4_e2m1fn_x2) the header's last dim / 2
    chunks: tuple[StoredChunk, ...]


class BlockedTensor(NamedTuple):
    """A tensor the checkpoint holds but this torch build cannot: refused only when a load targets it."""

    name: str
    dtype: str  # the safetensors dtype name
    shape: tuple[int, ...]  # the header shape (of the first stored piece)
    reason: str  # why, and the fix: completes "tensor <name> ..."
    pieces: tuple[tuple[str, int, int], ...]  # (file, absolute data offset, bytes) of each stored piece

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.pieces)


@dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint. ``directory``: the local directory, or for an object store the URI (a ``str``),
    with ``location`` its bucket and prefix and ``etags`` each file's ETag when it was opened (reads are
    pinned to them)."""

    directory: Path | str
    files: dict[str, header.Header]
    tensors: dict[str, TensorInfo]
    index: dict | None
    blocked: dict[str, BlockedTensor] = field(default_factory=dict)
    location: objstore.Location | None = None
    etags: dict[str, str] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of tensor data, blocked tensors included. Cheap: shapes were validated against the file sizes."""
        loadable = sum(math.prod(t.shape) * dtypes.itemsize(t.dtype) for t in self.tensors.values())
        return loadable + sum(b.nbytes for b in self.blocked.values())


def _confined(directory: Path, name: object) -> Path:
    """``directory/name``, refusing names that could leave the directory."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointFormatError(f"index names an invalid file {name!r}")
    if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise CheckpointFormatError(f"index names file {name!r} outside the checkpoint directory")
    path = directory / name
    real, root = os.path.realpath(path), os.path.realpath(directory)
    if os.path.commonpath([real, root]) != root and not _in_hub_blobs(directory, real):
        raise CheckpointFormatError(f"file {name!r} resolves to {real}, outside the checkpoint directory {root}")
    return path


def _in_hub_blobs(directory: Path, real: str) -> bool:
    """The Hugging Face download cache links ``snapshots/<rev>/f`` to ``../../blobs/<hash>``: allowed, only that."""
    d = Path(os.path.abspath(directory))
    if d.parent.name != "snapshots":
        return False
    blobs = os.path.realpath(d.parent.parent / "blobs")
    return os.path.commonpath([real, blobs]) == blobs and os.path.dirname(real) == blobs


def _read_index(directory: Path) -> dict:
    path = directory / INDEX_NAME
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise CheckpointFormatError(f"{path}: {size} bytes exceeds the {MAX_INDEX_BYTES}-byte limit for an index")
    return _parse_index(path.read_bytes(), str(path))


def _parse_index(raw: bytes, path: str) -> dict:
    """The index from its bytes (untrusted): a JSON object whose ``weight_map`` maps names to file names."""
    try:
        index = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, integers past Python's digit limit
        raise CheckpointFormatError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointFormatError(f"{path}: must be a JSON object with a 'weight_map' object")
    bad = [k for k, v in index["weight_map"].items() if not isinstance(v, str)]
    if bad:
        raise CheckpointFormatError(f"{path}: weight_map values must be file names; not so for {format_keys(bad)}")
    return index


def _read_header(path: Path, name: str) -> header.Header:
    try:  # O_NONBLOCK: a FIFO planted in place of a file must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointFormatError(f"checkpoint file {name!r} is missing from {path.parent}") from None
    except OSError as e:  # symlink loops, a path through a file, permissions
        raise CheckpointFormatError(f"checkpoint file {name!r} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointFormatError(f"checkpoint file {name!r} is not a regular file")
        return header.read(fd, st.st_size, str(path))
    finally:
        os.close(fd)


def _sharding_info(h: header.Header, name: str) -> dict[str, tuple[int, ...]]:
    raw = h.metadata.get(_SHARDING_KEY)
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
        out = {k: tuple(v["saved_offsets"]) for k, v in info.items()}
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointFormatError(f"{name}: malformed {_SHARDING_KEY} metadata ({e})") from None
    for k, offs in out.items():
        if k in h.entries and (
            len(offs) != len(h.entries[k].shape)
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
        ):
            raise CheckpointFormatError(f"{name}: {_SHARDING_KEY} offsets {list(offs)} for {k!r} do not fit its shape")
    return out


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint's index and headers. No tensor data is read.

    Args:
        path: a checkpoint directory: an index and its files, a lone ``model.safetensors``, or the
            ``*.safetensors`` shard files torch's own HF writer leaves.

    Returns:
        A :class:`Checkpoint`: the parsed headers, every tensor's stored pieces (``tensors``), the tensors
        this torch build cannot hold (``blocked``, with the reason), and the index.

    Raises:
        CheckpointFormatError: a missing directory or file, a malformed index or header (names the file and
            the fault; every check costs O(header bytes)), a file name outside the directory.

    Example::

        ckpt = hf_storage.open_checkpoint("/ckpt/step-1000")
        print(sorted(ckpt.tensors)[:3], ckpt.nbytes())
    """
    dtypes.check_host()
    if not objstore.is_uri(path) and not Path(path).is_dir():
        raise CheckpointFormatError(f"checkpoint directory {str(Path(path))!r} does not exist")
    source = files_at(path)
    index = source.index()
    if index is not None:
        wanted: dict[str, list[str]] = {}
        for fqn, fname in index["weight_map"].items():
            wanted.setdefault(fname, []).append(fqn)
    elif source.lone():
        wanted = {SINGLE_FILE_NAME: []}
    else:
        names = source.names()
        if not names:
            raise CheckpointFormatError(
                f"{source.where!r} holds no {INDEX_NAME}, no {SINGLE_FILE_NAME} and no *.safetensors files; "
                "is this a checkpoint directory? An interrupted save leaves no index."
            )
        wanted = {n: [] for n in names}
    files = source.headers_of(list(wanted))
    absent = [
        f"{fqn} (in {fname})" for fname, fqns in wanted.items() for fqn in fqns if fqn not in files[fname].entries
    ]
    if absent:
        raise CheckpointFormatError(f"the index names tensors their files do not hold: {format_keys(absent)}")
    listed = {fqn for fqns in wanted.values() for fqn in fqns} if index is not None else None
    tensors, blocked = _collect(files, listed), _blocked(files, listed)
    return Checkpoint(source.root, files, tensors, index, blocked, source.location, dict(source.etags))


# -- where the files are: a directory or a prefix in an object store --------------------------------------------


def files_at(path: str | os.PathLike) -> Directory | Objects:
    """The files of the checkpoint at ``path``: a local directory, or objects under an ``s3://`` prefix."""
    if objstore.is_uri(path):
        return Objects(objstore.Location.parse(os.fspath(path)))
    return Directory(Path(path))


class Directory:
    """A checkpoint's files in a local directory (names confined to it, see :func:`_confined`)."""

    location: objstore.Location | None = None

    def __init__(self, directory: Path):
        self.root = self.directory = directory
        self.where = str(directory)
        self.etags: dict[str, str] = {}

    def index(self) -> dict | None:
        """The validated index, or None when there is none."""
        return _read_index(self.directory) if (self.directory / INDEX_NAME).is_file() else None

    def lone(self) -> bool:
        return (self.directory / SINGLE_FILE_NAME).is_file()

    def names(self) -> list[str]:
        """The ``*.safetensors`` files, sorted."""
        return sorted(p.name for p in self.directory.glob("*.safetensors"))

    def header_of(self, name: str) -> header.Header:
        return _read_header(_confined(self.directory, name), name)

    def headers_of(self, names: list[str]) -> dict[str, header.Header]:
        return {name: self.header_of(name) for name in names}

    def json_start(self, name: str) -> bytes:
        """The first byte of the header JSON (the spec wants ``{``)."""
        with open(_confined(self.directory, name), "rb") as f:
            f.seek(8)
            return f.read(1)

    @contextmanager
    def opened(self, name: str) -> Iterator[Callable[[memoryview, int], int]]:
        """``read_at(buffer, offset) -> bytes read`` (0 at the end) of file ``name``."""
        fd = os.open(_confined(self.directory, name), os.O_RDONLY | os.O_NONBLOCK)
        try:
            yield lambda buf, offset: os.preadv(fd, [buf], offset)
        finally:
            os.close(fd)


_ETAGS_KEY = "object_etags"  # index metadata written by saves to object stores (hf_storage.remote.ETAGS_KEY)
_HEAD_BYTES = 256 * 2**10  # the first request for an object's header reads this much: usually all of it
_HEAD_THREADS = 16  # headers of this many objects are requested at once


class Objects:
    """A checkpoint's files as objects under a prefix of a bucket. Opening one HEADs it: its size bounds the
    header checks, its ETag pins every later read of it (:attr:`etags`)."""

    def __init__(self, location: objstore.Location):
        self.location = location
        self.root = self.where = location.uri
        self.etags: dict[str, str] = {}
        self._leads: dict[str, bytes] = {}
        self._listing: list[str] | None = None
        self._written: dict[str, str] = {}  # the ETags the index was written with (saves to object stores)

    def index(self) -> dict | None:
        raw = objstore.get_bytes(self.location, INDEX_NAME, MAX_INDEX_BYTES)
        index = None if raw is None else _parse_index(raw, f"{self.where}/{INDEX_NAME}")
        meta = index.get("metadata") if index is not None else None
        pinned = meta.get(_ETAGS_KEY) if isinstance(meta, dict) else None
        if isinstance(pinned, dict):
            self._written = {k: v for k, v in pinned.items() if isinstance(k, str) and isinstance(v, str)}
        return index

    def lone(self) -> bool:
        return SINGLE_FILE_NAME in self.names()

    def names(self) -> list[str]:
        if self._listing is None:
            self._listing = sorted(n for n in objstore.listing(self.location) if n.endswith(".safetensors"))
        return self._listing

    def header_of(self, name: str) -> header.Header:
        h, self.etags[name], self._leads[name] = self._header(name)
        return h

    def headers_of(self, names: list[str]) -> dict[str, header.Header]:
        """Every file's header, requested on several threads at once; the first failure in name order raises."""
        if len(names) < 2:
            return {name: self.header_of(name) for name in names}
        with ThreadPoolExecutor(min(_HEAD_THREADS, len(names)), thread_name_prefix="hf_storage-head") as ex:
            futures = [ex.submit(self._header, name) for name in names]
        out = {}
        for name, fut in zip(names, futures):
            out[name], self.etags[name], self._leads[name] = fut.result()
        return out

    def _header(self, name: str) -> tuple[header.Header, str, bytes]:
        """``(header, ETag, first byte of the JSON)`` of object ``name``."""
        info = objstore.head(self.location, _plain(name))
        if info is None:
            raise CheckpointFormatError(f"checkpoint file {name!r} is missing from {self.where}")
        if self._written.get(name, info["etag"]) != info["etag"]:
            raise objstore.ObjectChangedError(
                f"{self.where}/{name} is not the object its index was written with (another save replaced the "
                "checkpoint while it was being opened); open it again"
            )
        first = _ObjectStart(self.location, name, info["etag"], info["size"])
        return header.fetch(first.read_at, info["size"], f"{self.where}/{name}"), info["etag"], first.lead

    def json_start(self, name: str) -> bytes:
        return self._leads[name]

    @contextmanager
    def opened(self, name: str) -> Iterator[Callable[[memoryview, int], int]]:
        """``read_at(buffer, offset) -> bytes read`` of object ``name``, pinned to its ETag at open."""
        etag = self.etags[name]

        def read_at(buf: memoryview, offset: int) -> int:
            objstore.read_into(self.location, name, etag, buf, offset)
            return len(buf)

        yield read_at


class _ObjectStart:
    """Ranged reads of the start of an object: the first request fetches up to 256 KiB, which serves the length
    prefix and usually the whole header; the rest, if any, takes one more."""

    def __init__(self, location: objstore.Location, name: str, etag: str, size: int):
        self.location, self.name, self.etag, self.size = location, name, etag, size
        self._start: bytes | None = None

    def _get(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        objstore.read_into(self.location, self.name, self.etag, memoryview(buf), offset)
        return bytes(buf)

    def read_at(self, offset: int, n: int) -> bytes:
        if self._start is None:
            self._start = self._get(0, min(self.size, _HEAD_BYTES))
        have = self._start[offset : offset + n]
        return have if len(have) == n else have + self._get(offset + len(have), n - len(have))

    @property
    def lead(self) -> bytes:
        return (self._start or b"")[8:9]


def _plain(name: object) -> str:
    """An object name from the index, refused unless it names an object under the checkpoint's prefix."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointFormatError(f"index names an invalid file {name!r}")
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "\\" in name:
        raise CheckpointFormatError(f"index names file {name!r} outside the checkpoint directory")
    if "" in parts or "." in parts:
        raise CheckpointFormatError(f"index names an invalid file {name!r} (an empty or '.' part of its path)")
    return name


def _listed_entries(files: dict[str, header.Header], listed: set[str] | None):
    """``(file, its DCP_SHARDING_INFO offsets, entry)`` of every entry the index lists (all without an index)."""
    for fname, h in files.items():
        sharding = _sharding_info(h, fname)
        for e in h.entries.values():
            if listed is None or e.name in listed:
                yield fname, sharding, e


def _collect(files: dict[str, header.Header], listed: set[str] | None) -> dict[str, TensorInfo]:
    """The tensors this torch build can load, their stored pieces assembled and checked; see :func:`_blocked`."""
    pieces: dict[str, list[StoredChunk]] = {}
    blocked: set[str] = set()
    for fname, sharding, e in _listed_entries(files, listed):
        if dtypes.unloadable(e.dtype, e.shape) is not None:
            blocked.add(e.name)
            continue
        dtype = dtypes.to_torch(e.dtype, e.name)
        offs = sharding.get(e.name, (0,) * len(e.shape))
        pieces.setdefault(e.name, []).append(
            StoredChunk(fname, e.begin, dtype, dtypes.torch_shape(dtype, e.shape), offs)
        )
    return {name: _assemble(name, chunks) for name, chunks in pieces.items() if name not in blocked}


def _blocked(files: dict[str, header.Header], listed: set[str] | None) -> dict[str, BlockedTensor]:
    """The tensors this torch build cannot hold (valid headers all the same), with the reason for each."""
    pieces: dict[str, list[tuple[str, int, int]]] = {}
    why: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for fname, _, e in _listed_entries(files, listed):
        pieces.setdefault(e.name, []).append((fname, e.begin, e.nbytes))
        reason = dtypes.unloadable(e.dtype, e.shape)
        if reason is not None and e.name not in why:
            why[e.name] = (e.dtype, e.shape, reason)
    return {name: BlockedTensor(name, *why[name], tuple(pieces[name])) for name in why}


def _assemble(name: str, chunks: list[StoredChunk]) -> TensorInfo:
    """One tensor from its stored pieces: one dtype, each element stored exactly once."""
    if len(chunks) == 1 and not any(chunks[0].offsets):  # the usual case: one whole tensor
        c = chunks[0]
        return TensorInfo(name, c.dtype, c.shape, (c,))
    kinds = {c.dtype for c in chunks}
    if len(kinds) > 1:
        raise CheckpointFormatError(f"tensor {name!r} is stored with several dtypes: {sorted(map(str, kinds))}")
    if len({c.offsets for c in chunks}) != len(chunks):
        raise CheckpointFormatError(f"tensor {name!r} is stored more than once: {[c.file for c in chunks]}")
    ndim = {len(c.shape) for c in chunks}
    if len(ndim) > 1:
        raise CheckpointFormatError(f"pieces of tensor {name!r} disagree on the number of dimensions")
    shape = tuple(max(c.offsets[d] + c.shape[d] for c in chunks) for d in range(len(chunks[0].shape)))
    if any(d > _MAX_DIM for d in shape):  # forged DCP_SHARDING_INFO offsets: keep products small, torch.Size valid
        raise CheckpointFormatError(f"the pieces of tensor {name!r} place it past dimension size {_MAX_DIM}")
    stored = sum(math.prod(c.shape) for c in chunks)  # validated header shapes: each bounded by its file's size
    if stored != math.prod(shape):
        raise CheckpointFormatError(f"the pieces of tensor {name!r} do not tile its shape {list(shape)}")
    _check_disjoint(name, chunks)
    return TensorInfo(name, chunks[0].dtype, shape, tuple(chunks))


def _check_disjoint(name: str, chunks: list[StoredChunk]) -> None:
    """Pieces must not overlap: with equal volume, an overlap would hide a hole of unwritten memory."""
    if len(chunks) < 2 or not chunks[0].shape:
        return
    order = sorted(chunks, key=lambda c: c.offsets)
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            if b.offsets[0] >= a.offsets[0] + a.shape[0]:
                break
            if all(bo < ao + as_ and ao < bo + bs for ao, as_, bo, bs in zip(a.offsets, a.shape, b.offsets, b.shape)):
                raise CheckpointFormatError(f"pieces of tensor {name!r} in {a.file} and {b.file} overlap")


def to_metadata(ckpt: Checkpoint) -> Metadata:
    """DCP metadata: one chunk per stored piece; ``storage_data`` maps each chunk to its StoredChunk."""
    sd_meta: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    storage: dict[MetadataIndex, StoredChunk] = {}
    for t in ckpt.tensors.values():
        sd_meta[t.name] = TensorStorageMetadata(
            properties=TensorProperties(dtype=t.dtype),
            size=torch.Size(t.shape),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.shape)) for c in t.chunks],
        )
        for c in t.chunks:
            storage[MetadataIndex(fqn=t.name, offset=torch.Size(c.offsets))] = c
    return Metadata(state_dict_metadata=sd_meta, storage_data=storage)


def check_targets(
    ckpt: Checkpoint,
    targets: dict[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    strict: bool = True,
    allow_cast: bool = False,
) -> None:
    """One error naming every target key that is missing, that this torch build cannot load, or whose shape /
    dtype differs. A blocked key is refused even with ``strict=False``: it is present, only not loadable here."""
    problems, fixes = [], {}
    for name, (shape, dtype) in targets.items():
        t = ckpt.tensors.get(name)
        if name in ckpt.blocked:
            problems.append(f"{name}: {ckpt.blocked[name].reason}")
            fixes["blocked"] = "drop the keys this torch build cannot hold from the state dict, or follow their fix"
        elif t is None:
            if strict:
                problems.append(f"{name}: missing from the checkpoint")
                fixes["missing"] = "pass strict=False to skip missing keys"
        else:
            if tuple(shape) != t.shape:
                problems.append(f"{name}: shape {list(shape)} but the checkpoint has {list(t.shape)}")
                fixes["shape"] = "build the target with the checkpoint's shapes"
            if dtype != t.dtype and not allow_cast:
                problems.append(f"{name}: dtype {dtype} but the checkpoint has {t.dtype}")
                fixes["dtype"] = "pass allow_cast=True to convert dtypes"
    if problems:
        raise StateDictMismatchError(
            f"{len(problems)} target tensors do not match the checkpoint at {ckpt.directory}: "
            + "; ".join(problems[:50])
            + (f"; ... ({len(problems) - 50} more)" if len(problems) > 50 else "")
            + f". Fix: {'; '.join(fixes.values())}."
        )


class _FileCache:
    def __init__(self, directory: Path):
        self.directory = directory
        self.fds: dict[str, int] = {}

    def fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(_confined(self.directory, name), os.O_RDONLY)
        return self.fds[name]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def read_requests(
    source: Checkpoint | str | os.PathLike,
    requests: Iterable[tuple[StoredChunk, torch.Tensor, Box]],
    *,
    thread_count: int = 1,
    budget: int = engine.DEFAULT_BUDGET,
) -> int:
    """Fill each target from the box (offsets and sizes inside the stored piece) of a stored piece.
    Returns bytes read.

    ``source``: the opened :class:`Checkpoint` (an object store's reads are then pinned to the ETags seen when
    it was opened), or its directory or ``s3://`` URI (objects are then pinned at their first read).
    """
    if isinstance(source, Checkpoint):
        if source.location is not None:
            return _read_objects(_Pins(source.location, source.etags), requests, thread_count, budget)
        source = source.directory
    if objstore.is_uri(source):
        pins = _Pins(objstore.Location.parse(os.fspath(source)), {})
        return _read_objects(pins, requests, thread_count, budget)
    directory = Path(source)
    files = _FileCache(directory)
    buf = engine.HostBuffer(budget)
    total = 0
    mapped = engine.is_local_fs(directory)
    try:
        with engine.IOPool(thread_count) as pool:
            for chunk, target, box in requests:
                place = engine.Place(files.fd(chunk.file), chunk.begin, chunk.shape)
                total += engine.read_box(pool, buf, place, target, chunk.dtype, box, mapped)
    finally:
        files.close()
    return total


class _Pins:
    """The ETag every object is read under: the one recorded when the checkpoint was opened, else the one a HEAD
    finds at its first read. ``fetch`` is :class:`engine.RangedReads`' request."""

    def __init__(self, location: objstore.Location, etags: dict[str, str]):
        self.location, self.etags = location, dict(etags)
        self._lock = threading.Lock()

    def etag(self, name: str) -> str:
        with self._lock:
            if name not in self.etags:
                info = objstore.head(self.location, _plain(name))
                if info is None:
                    raise CheckpointFormatError(f"checkpoint file {name!r} is missing from {self.location.uri}")
                self.etags[name] = info["etag"]
            return self.etags[name]

    def fetch(self, name: str, buf: memoryview, offset: int) -> None:
        objstore.read_into(self.location, name, self.etag(name), buf, offset)


def _read_objects(
    pins: _Pins, requests: Iterable[tuple[StoredChunk, torch.Tensor, Box]], thread_count: int, budget: int
) -> int:
    """:func:`read_requests` from an object store: ranged GETs on ``thread_count`` threads, at most ``budget``
    bytes of scratch buffers in all."""
    total = 0
    with engine.IOPool(thread_count) as pool:
        ranged = engine.RangedReads(pool, pins.fetch, budget)
        try:
            for chunk, target, box in requests:
                total += ranged.read_box(chunk.file, chunk.begin, chunk.shape, target, chunk.dtype, box)
            ranged.flush()
        except BaseException:
            ranged.failed = True  # skip what is queued; the pool's close re-raises a request's error first
            raise
    return total
