"""Check a checkpoint directory without loading it: structure, spec conformance and checksums.

    python -m hf_storage verify /ckpt/step-1000      # exit 0: ok, 1: problems found, 2: usage error
    python -m hf_storage inspect /ckpt/step-1000 [--json]
    python -m hf_storage verify s3://bucket/ckpt/step-1000

An object-store prefix is checked the same way, through ranged reads (checksums in blocks of ``block_bytes``,
each pinned to the ETag the object had when its header was read); what only a filesystem has (symbolic links,
FIFOs) is not checked there.

:func:`verify` runs the reader's own validation (index, file confinement, every header, assembly of stored
pieces) file by file, so that one broken file does not hide the others, then adds what a loader does not
check: the index's ``metadata`` (``total_size``, the checksum block) and the CRC-32 of every tensor,
recomputed by streaming its bytes through one bounded buffer.

Two levels of finding:

* **problems**: the checkpoint would fail to load, or would load wrong data. ``Report.ok`` is False.
* **warnings**: the checkpoint loads, but breaks the profile this writer guarantees: 8-byte aligned header,
  ``__metadata__.format == "pt"``, tensors aligned to their item size, checksums recorded for every
  tensor, no stray tensors or files. Checkpoints from other writers (torch's ``HuggingFaceStorageWriter``
  writes neither the padding nor ``format``) are readable, so these stay warnings; ``--strict`` (or
  ``Report.clean``) treats them as failures.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import checksum, dtypes, header, objstore, reader
from .errors import CheckpointFormatError, format_keys
from .layout import INDEX_NAME, SINGLE_FILE_NAME, natural_key

__all__ = ["verify", "inspect", "Report", "Finding", "Row", "BLOCK_BYTES", "human_size"]

BLOCK_BYTES = 16 * 2**20  # checksum reads go through one buffer of this size
_CRC_RE = re.compile(r"^[0-9a-f]{8}$")
_FIX_FILE = "re-download or re-save this file"
_FIX_INDEX = f"re-download {INDEX_NAME} or re-save the checkpoint"


@dataclass(frozen=True)
class Finding:
    """One problem or warning: where (file, tensor), what is wrong, and what to do about it."""

    cause: str
    file: str | None = None
    tensor: str | None = None
    fix: str | None = None

    def __str__(self) -> str:
        where = [w for w in (self.file, f"tensor {self.tensor!r}" if self.tensor is not None else None) if w]
        text = ": ".join([*where, self.cause])
        return f"{text}. Fix: {self.fix}" if self.fix else text


@dataclass
class Report:
    """The outcome of :func:`verify`. ``ok``: no problems; ``clean``: no warnings either."""

    path: str
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    files: int = 0
    tensors: int = 0
    data_bytes: int = 0
    checksummed: int = 0  # tensors whose CRC-32 was recomputed and matched

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def clean(self) -> bool:
        return self.ok and not self.warnings

    def problem(self, cause: str, file: str | None = None, tensor: str | None = None, fix: str | None = None) -> None:
        self.problems.append(Finding(cause, file, tensor, fix))

    def warn(self, cause: str, file: str | None = None, tensor: str | None = None, fix: str | None = None) -> None:
        self.warnings.append(Finding(cause, file, tensor, fix))

    def format(self) -> str:
        lines = [
            f"checkpoint {self.path}",
            f"  {self.files} files, {self.tensors} tensors, {human_size(self.data_bytes)} of tensor data, "
            f"{self.checksummed} checksums verified",
        ]
        lines += [f"  PROBLEM  {f}" for f in self.problems]
        lines += [f"  warning  {f}" for f in self.warnings]
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {len(self.problems)} problems, {len(self.warnings)} warnings")
        return "\n".join(lines)


class Row(NamedTuple):
    """One tensor (or stored piece of one) as :func:`inspect` lists it."""

    file: str
    tensor: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def verify(path: str | os.PathLike, *, checksums: bool = True, block_bytes: int = BLOCK_BYTES) -> Report:
    """Check the checkpoint at ``path`` (a directory or ``s3://bucket/prefix``) and return a :class:`Report`;
    raises nothing for a bad checkpoint (an object store that cannot be asked raises its
    :class:`~hf_storage.objstore.ObjectStoreError`).

    ``checksums=False`` skips the data pass (structure only: reads the index and headers, no tensor data).
    """
    remote = objstore.is_uri(path)
    rep = Report(os.fspath(path) if remote else str(Path(path)))
    if not remote and not Path(path).is_dir():
        rep.problem("not a directory", fix="pass the checkpoint directory")
        return rep
    source = reader.files_at(path)
    index, wanted = _index(source, rep)
    headers = _headers(source, wanted, rep)
    listed = {fqn for fqns in wanted.values() for fqn in fqns} if index is not None else None
    spans = _spans(_tensors(headers, listed, rep), _blocked(headers, listed, rep))
    rep.files, rep.tensors = len(headers), len(spans)
    rep.data_bytes = sum(n for pieces in spans.values() for _, _, n in pieces)
    if index is not None:
        _check_total_size(index, rep)
    recorded = _recorded_checksums(index, spans, rep)
    if checksums and recorded:
        _check_checksums(source, spans, recorded, rep, block_bytes)
    if rep.ok:
        _cross_check(path, rep)
    return rep


def inspect(path: str | os.PathLike) -> list[Row]:
    """Every tensor of every file of the checkpoint, in file order then data order.

    Raises :class:`CheckpointFormatError` for a checkpoint the reader refuses (run :func:`verify`).
    """
    ckpt = reader.open_checkpoint(path)
    rows = []
    for fname in sorted(ckpt.files, key=_order):
        for e in sorted(ckpt.files[fname].entries.values(), key=lambda e: e.begin):
            rows.append(Row(fname, e.name, e.dtype, e.shape, e.nbytes))
    return rows


# --- steps of verify -----------------------------------------------------------------------------------


@contextmanager
def _caught(rep: Report, file: str | None, fix: str) -> Iterator[None]:
    """Turn whatever the reader raises for one step into a problem, so the other steps still run.

    Anything but :class:`CheckpointFormatError` is a reader bug on hostile input; it is reported the same
    way, with its type, so that ``verify`` itself never crashes on a bad checkpoint.
    """
    try:
        yield
    except CheckpointFormatError as e:
        rep.problem(_strip_label(str(e), file), file, fix=fix)
    except (OSError, ValueError, RecursionError) as e:
        rep.problem(f"{type(e).__name__}: {_strip_label(str(e), file)}", file, fix=fix)


def _strip_label(msg: str, file: str | None) -> str:
    """Reader messages start with the file's full path (or URI); the finding names the file already."""
    head, sep, rest = msg.partition(": ")
    named = file and (head == file or head.endswith(os.sep + file) or head.endswith("/" + file))
    return rest if sep and named else msg


_FAILED = object()


def _index(source: reader.Directory | reader.Objects, rep: Report) -> tuple[dict | None, dict[str, list[str]]]:
    """The index (None without one) and the files the checkpoint consists of, each with its listed FQNs."""
    index: object = _FAILED
    with _caught(rep, INDEX_NAME, _FIX_INDEX):
        index = source.index()
    if index is _FAILED:
        return None, {}
    if isinstance(index, dict):
        if not index["weight_map"]:
            rep.warn("the index lists no tensors", INDEX_NAME, fix=_FIX_INDEX)
        wanted: dict[str, list[str]] = {}
        for fqn, fname in index["weight_map"].items():
            wanted.setdefault(fname, []).append(fqn)
        _check_index_metadata(index, rep)
        _warn_stray_files(source, set(wanted), rep)
        return index, wanted
    rep.warn(f"no {INDEX_NAME}, so no checksums to verify", fix="save with hf_storage to record checksums")
    if source.lone():
        return None, {SINGLE_FILE_NAME: []}
    names = source.names()
    if not names:
        rep.problem(
            f"no {INDEX_NAME}, no {SINGLE_FILE_NAME} and no *.safetensors files; an interrupted save leaves no index",
            fix="point at a complete checkpoint directory",
        )
    return None, {n: [] for n in names}


def _check_index_metadata(index: dict, rep: Report) -> None:
    meta = index.setdefault("metadata", {})
    if not isinstance(meta, dict):
        rep.problem(f"'metadata' must be an object, got {type(meta).__name__}", INDEX_NAME, fix=_FIX_INDEX)
        index["metadata"] = {}


def _warn_stray_files(source: reader.Directory | reader.Objects, named: set[str], rep: Report) -> None:
    stray = [name for name in source.names() if name not in named]
    if stray:
        rep.warn(
            f"files the index does not name (loaders ignore them): {format_keys(stray)}",
            INDEX_NAME,
            fix="delete them, or re-save if they belong to the checkpoint",
        )


def _headers(
    source: reader.Directory | reader.Objects, wanted: dict[str, list[str]], rep: Report
) -> dict[str, header.Header]:
    """Each file's validated header (the reader's own checks), then what the index says it holds."""
    headers = {}
    for fname in sorted(wanted, key=_order):
        with _caught(rep, fname, _FIX_FILE):
            headers[fname] = source.header_of(fname)
        if fname in headers:
            _check_conformance(source, fname, headers[fname], rep)
            _check_listed(fname, headers[fname], wanted[fname], rep)
    return headers


def _check_conformance(source: reader.Directory | reader.Objects, fname: str, h: header.Header, rep: Report) -> None:
    """What the safetensors spec recommends and this writer guarantees; warnings, see the module docstring."""
    n = h.data_start - 8
    if n % 8:
        rep.warn(
            f"header length {n} is not a multiple of 8 (tensor data is not 8-byte aligned)",
            fname,
            fix="re-save with hf_storage, which pads headers",
        )
    if source.json_start(fname) != b"{":
        rep.warn("header JSON does not start with '{' as the spec requires", fname, fix=_FIX_FILE)
    fmt = h.metadata.get("format")
    if fmt != "pt":
        what = "has no __metadata__.format" if fmt is None else f"has __metadata__.format {fmt!r}"
        rep.warn(f"{what}; transformers expects 'pt' for torch weights", fname, fix="re-save with hf_storage")
    odd = [e.name for e in h.entries.values() if (e.begin - h.data_start) % _itemsize(e.dtype)]
    if odd:
        rep.warn(f"tensors not aligned to their item size: {format_keys(odd)}", fname, fix="re-save with hf_storage")


def _order(name: str) -> tuple:
    """Natural order for names from an untrusted file: ``natural_key`` with a tie-break, and no int() of
    digit runs longer than Python converts (a forged 5000-digit name would raise ValueError)."""
    return (1, (), name) if len(name) > 600 else (0, natural_key(name), name)


def _itemsize(dtype_name: str) -> int:
    """Alignment unit of a (validated) header dtype, whether or not this torch build has it: sub-byte ones 1."""
    return max(1, dtypes.BITS[dtype_name] // 8)


def _check_listed(fname: str, h: header.Header, fqns: list[str], rep: Report) -> None:
    for fqn in fqns:
        if fqn not in h.entries:
            rep.problem(
                "the index places this tensor here, but the file does not hold it",
                fname,
                fqn,
                fix=f"correct the weight_map of {INDEX_NAME} or re-save",
            )
    if fqns:
        extra = sorted(set(h.entries) - set(fqns), key=_order)
        if extra:
            rep.warn(
                f"holds tensors the index does not list for it (loaders skip them): {format_keys(extra)}",
                fname,
                fix="re-save, or add them to the weight_map",
            )


def _tensors(headers: dict[str, header.Header], listed: set[str] | None, rep: Report) -> dict[str, reader.TensorInfo]:
    """The reader's assembly of stored pieces into tensors; on error, one problem per offending tensor."""
    try:
        return reader._collect(headers, listed)
    except CheckpointFormatError as first:
        names = sorted(
            {e.name for h in headers.values() for e in h.entries.values() if listed is None or e.name in listed},
            key=_order,
        )
        out, before = {}, len(rep.problems)
        for name in names:
            try:
                out.update(reader._collect(headers, {name}))
            except CheckpointFormatError as e:
                rep.problem(str(e), tensor=name, fix="re-save the checkpoint; each tensor must be stored once")
        if len(rep.problems) == before:  # the failure was not tied to one tensor
            rep.problem(str(first), fix=_FIX_FILE)
        return out


def _blocked(
    headers: dict[str, header.Header], listed: set[str] | None, rep: Report
) -> dict[str, reader.BlockedTensor]:
    """Tensors this torch build cannot load: a warning each, not a problem (a newer torch loads them)."""
    try:
        blocked = reader._blocked(headers, listed)
    except CheckpointFormatError:  # malformed sharding info: _tensors has reported it
        return {}
    for name in sorted(blocked, key=_order):
        rep.warn(f"cannot be loaded here: it {blocked[name].reason}", tensor=name)
    return blocked


def _spans(tensors: dict[str, reader.TensorInfo], blocked: dict[str, reader.BlockedTensor]) -> dict[str, list]:
    """``(file, absolute data offset, bytes)`` of each stored piece of every tensor, blocked ones included."""
    spans = {
        name: [(c.file, c.begin, math.prod(c.shape) * dtypes.itemsize(c.dtype)) for c in t.chunks]
        for name, t in tensors.items()
    }
    spans.update({name: list(b.pieces) for name, b in blocked.items()})
    return spans


def _check_total_size(index: dict, rep: Report) -> None:
    """``metadata.total_size``: the bytes of tensor data the index lists."""
    total = index["metadata"].get("total_size")
    if total is None:
        rep.warn("index has no metadata.total_size", INDEX_NAME, fix="re-save with hf_storage")
    elif not isinstance(total, int) or isinstance(total, bool) or total != rep.data_bytes:
        rep.problem(
            f"metadata.total_size is {total!r} but the tensors hold {rep.data_bytes} bytes", INDEX_NAME, fix=_FIX_INDEX
        )


def _recorded_checksums(index: dict | None, tensors: dict[str, list], rep: Report) -> dict[str, int]:
    """``metadata.checksums`` validated: ``{"algorithm": "crc32", "tensors": {fqn: "%08x"}}``."""
    if index is None:
        return {}
    block = index["metadata"].get("checksums")
    if block is None:
        rep.warn(
            "index records no checksums; data integrity not checked",
            INDEX_NAME,
            fix="save with hf_storage (checksums=True) to record them",
        )
        return {}
    if not (isinstance(block, dict) and isinstance(block.get("tensors"), dict)):
        rep.problem(
            "metadata.checksums must be {'algorithm': 'crc32', 'tensors': {fqn: hex}}", INDEX_NAME, fix=_FIX_INDEX
        )
        return {}
    if block.get("algorithm") != "crc32":
        rep.warn(
            f"unknown checksum algorithm {block.get('algorithm')!r}; data integrity not checked",
            INDEX_NAME,
            fix="verify with the tool that wrote the checkpoint",
        )
        return {}
    recorded = {}
    for fqn, value in block["tensors"].items():
        if isinstance(value, str) and _CRC_RE.match(value):
            recorded[fqn] = int(value, 16)
        else:
            rep.problem(f"recorded checksum {value!r} is not 8 lowercase hex digits", INDEX_NAME, fqn, fix=_FIX_INDEX)
    unknown = sorted(set(recorded) - set(tensors), key=_order)
    if unknown:
        rep.problem(
            f"checksums recorded for tensors the checkpoint does not hold: {format_keys(unknown)}",
            INDEX_NAME,
            fix=_FIX_INDEX,
        )
    missing = sorted(set(tensors) - set(block["tensors"]), key=_order)
    if missing:
        rep.warn(f"no checksum recorded for {format_keys(missing)}", INDEX_NAME, fix="re-save with hf_storage")
    return {k: v for k, v in recorded.items() if k in tensors}


def _check_checksums(
    source: reader.Directory | reader.Objects,
    spans: dict[str, list],
    recorded: dict[str, int],
    rep: Report,
    block_bytes: int,
) -> None:
    """Recompute each recorded CRC-32, file by file in data order, through one reused buffer."""
    buf = memoryview(bytearray(max(1, block_bytes)))
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for name in recorded:
        pieces = spans[name]
        if len(pieces) != 1:
            rep.warn(f"stored in {len(pieces)} pieces; its checksum is not checked", tensor=name)
            continue
        fname, begin, nbytes = pieces[0]
        by_file.setdefault(fname, []).append((begin, nbytes, name))
    for fname in sorted(by_file, key=_order):
        with _caught(rep, fname, _FIX_FILE), source.opened(fname) as read_at:
            for begin, nbytes, name in sorted(by_file[fname]):
                got = _crc32(read_at, begin, nbytes, buf)
                if got == recorded[name]:
                    rep.checksummed += 1
                else:
                    rep.problem(
                        f"CRC-32 of its bytes [{begin}, {begin + nbytes}) is {got:08x}, the index "
                        f"records {recorded[name]:08x}: the data is corrupted",
                        fname,
                        name,
                        fix="restore this file from a good copy or re-save the checkpoint",
                    )


def _crc32(read_at: Callable[[memoryview, int], int], begin: int, nbytes: int, buf: memoryview) -> int:
    """CRC-32 of bytes ``[begin, begin + nbytes)`` read through ``buf`` (``read_at(buffer, offset) -> count``)."""
    crc, pos, end = 0, begin, begin + nbytes
    while pos < end:
        n = read_at(buf[: min(len(buf), end - pos)], pos)
        if n == 0:
            raise CheckpointFormatError(f"file ends at byte {pos}, inside tensor data (truncated while verifying?)")
        crc = checksum.crc32(buf[:n], crc)
        pos += n
    return crc


def _cross_check(path: str | os.PathLike, rep: Report) -> None:
    """Belt and braces: a checkpoint verify passes must also open with the reader itself."""
    with _caught(rep, None, "report this as an hf_storage bug: verify and the reader disagree"):
        reader.open_checkpoint(path)


def human_size(n: int) -> str:
    size: float = n
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # unreachable
