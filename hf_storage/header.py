"""Build and parse safetensors headers.

A safetensors file is ``u64 little-endian header length N`` + ``N bytes of JSON`` + data. The JSON maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
the header) plus an optional ``"__metadata__"`` object of string values. We always pad the JSON with spaces
so that the data starts on an 8-byte boundary, and always write ``{"format": "pt"}``.

Parsing treats the file as untrusted: the header size is bounded, every field is type-checked, a shape has
at most :data:`MAX_DIMS` dimensions (so every check costs time linear in the header's bytes), each entry
spans exactly its elements' bits (sub-byte dtypes such as ``F4`` included; every dtype the format names is
accepted, whether or not this torch build has it), and offsets must tile the data section exactly (no holes,
no overlaps, nothing past the end of the file).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from . import dtypes
from .errors import CheckpointFormatError

MAX_HEADER_BYTES = 100 * 1000 * 1000
_ALIGN = 8
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


class TensorEntry(NamedTuple):
    """One tensor of a safetensors file: dtype name, shape and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def encode(entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str] | None = None) -> bytes:
    """The header bytes (length prefix included) for ``entries`` of ``(name, dtype, shape, begin, end)``.

    ``begin``/``end`` are relative to the start of the data section, as in the format.
    """
    meta = {"format": "pt"}
    meta.update(metadata or {})
    obj: dict[str, object] = {"__metadata__": meta}
    for name, dtype, shape, begin, end in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def read(fd: int, file_size: int, where: str = "") -> Header:
    """Read and validate the header of the open file ``fd`` of ``file_size`` bytes."""
    return fetch(lambda offset, n: os.pread(fd, n, offset), file_size, where or f"fd {fd}")


def fetch(read_at: Callable[[int, int], bytes], file_size: int, label: str) -> Header:
    """Read and validate the header of a file of ``file_size`` bytes through ``read_at(offset, count)`` (a
    ``pread``, or ranged reads of an object): the length prefix first, bounded, then the JSON."""
    if file_size < 8:
        raise CheckpointFormatError(f"{label}: {file_size} bytes is too short for a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", read_at(0, 8))
    if n > MAX_HEADER_BYTES:
        raise CheckpointFormatError(f"{label}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise CheckpointFormatError(
            f"{label}: header length {n} runs past the end of the {file_size}-byte file (truncated?)"
        )
    raw = read_at(8, n)
    if len(raw) != n:
        raise CheckpointFormatError(f"{label}: short read of the header (file changed while reading?)")
    return decode(raw, file_size, label)


def decode(raw: bytes, file_size: int, label: str = "header") -> Header:
    """Validate header JSON ``raw`` (without the length prefix) of a file of ``file_size`` bytes."""
    data_start = 8 + len(raw)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CheckpointFormatError(f"{label}: header names {_brief(e.args[0])} twice") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, integers past Python's digit limit
        raise CheckpointFormatError(f"{label}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{label}: header must be a JSON object, got {type(obj).__name__}")
    metadata = _check_metadata(obj.pop("__metadata__", {}), label)
    entries = {name: _check_entry(name, value, data_start, label) for name, value in obj.items()}
    _check_tiling(entries, data_start, file_size, label)
    return Header(entries, metadata, data_start, file_size)


_MAX_DIM = 2**63 - 1  # torch.Size holds int64
MAX_DIMS = 64
"""Most dimensions a header shape may have. torch's CUDA kernels refuse tensors of more than 25 dimensions
(``MAX_TENSORINFO_DIMS``) and no model tensor comes close, so 64 refuses nothing real. Without a cap, the
product of a forged shape of 200,000 dimensions of 2 (a 0.6 MB header) costs seconds of big-integer
arithmetic, quadratic in the header's size; with it, every entry costs O(1) beyond reading its bytes."""


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _check_metadata(meta, label: str) -> dict[str, str]:
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{label}: __metadata__ must be an object of strings, got {type(meta).__name__}")
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise CheckpointFormatError(f"{label}: __metadata__ values must be strings; not so for {bad}")
    return meta


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_BITS = dtypes.BITS


def _check_entry(name: str, value, data_start: int, label: str) -> TensorEntry:
    """Fast acceptance of a well-formed entry; anything else goes to the checks that name the fault.

    The dimension count is checked before any dimension is looked at, so the product below multiplies at
    most :data:`MAX_DIMS` integers of at most 63 bits: a forged shape cannot make it slow.
    """
    if type(value) is dict and len(value) == 3:
        dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
        if (
            type(dtype) is str
            and dtype in _BITS
            and type(shape) is list
            and len(shape) <= MAX_DIMS
            and type(offsets) is list
            and len(offsets) == 2
            and type(offsets[0]) is int
            and type(offsets[1]) is int
            and all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)
            and 0 <= offsets[0] <= offsets[1]
            and (offsets[1] - offsets[0]) * 8 == math.prod(shape) * _BITS[dtype]
        ):
            return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    return _check_entry_slowly(name, value, data_start, label)


def _check_entry_slowly(name: str, value, data_start: int, label: str) -> TensorEntry:
    where = f"{label}: tensor {_brief(name)}"
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{where}: entry must be an object, got {type(value).__name__}")
    if set(value) != _ENTRY_KEYS:
        missing, extra = _ENTRY_KEYS - set(value), set(value) - _ENTRY_KEYS
        raise CheckpointFormatError(
            f"{where}: entry keys must be {sorted(_ENTRY_KEYS)}; "
            f"missing {sorted(missing)}, unexpected {_brief(sorted(extra))}"
        )
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str):
        raise CheckpointFormatError(f"{where}: dtype must be a string, got {_brief(dtype)}")
    if dtype not in _BITS:
        raise CheckpointFormatError(f"{where}: unknown safetensors dtype {_brief(dtype)}; known: {', '.join(_BITS)}")
    _check_shape(shape, where)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointFormatError(f"{where}: data_offsets must be two integers, got {_brief(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointFormatError(f"{where}: data_offsets {offsets} are not 0 <= begin <= end")
    bits = math.prod(shape) * _BITS[dtype]
    if bits % 8:
        raise CheckpointFormatError(
            f"{where}: shape {shape} of {dtype} holds {bits} bits, not a whole number of "
            "bytes (a sub-byte dtype needs an element count that fills its last byte)"
        )
    if end - begin != bits // 8:
        raise CheckpointFormatError(
            f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {dtype} needs {bits // 8}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_shape(shape, where: str) -> None:
    """A list of at most MAX_DIMS integers in [0, 2**63): the count first, so that every later step is O(1)."""
    if isinstance(shape, list) and len(shape) > MAX_DIMS:
        raise CheckpointFormatError(
            f"{where}: shape has {len(shape)} dimensions; at most {MAX_DIMS} are allowed "
            "(torch's CUDA kernels stop at 25). The file is corrupt or forged; re-download it"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointFormatError(f"{where}: shape must be a list of non-negative integers, got {_brief(shape)}")
    if any(d > _MAX_DIM for d in shape):
        raise CheckpointFormatError(f"{where}: a dimension of shape {_brief(shape)} exceeds {_MAX_DIM}")


def _brief(value, limit: int = 200) -> str:
    """``repr`` of an untrusted JSON value, cut to about ``limit`` characters (a forged value can be megabytes)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, list) and len(value) > 16:
        return _brief(value[:16])[:-1] + f", ... ({len(value)} items)]"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_tiling(entries: dict[str, TensorEntry], data_start: int, file_size: int, label: str) -> None:
    pos = data_start
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            kind = (
                "overlaps the previous tensor" if e.begin < pos else f"leaves a hole of {e.begin - pos} bytes before it"
            )
            raise CheckpointFormatError(
                f"{label}: tensor {_brief(e.name)} at data offset {e.begin - data_start} {kind}"
            )
        pos = e.end
    if pos > file_size:
        raise CheckpointFormatError(
            f"{label}: tensor data ends at byte {pos} but the file has {file_size} bytes (truncated?)"
        )
    if pos < file_size:
        raise CheckpointFormatError(f"{label}: {file_size - pos} trailing bytes after the last tensor")
