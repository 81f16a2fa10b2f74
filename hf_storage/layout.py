"""The file layout of a checkpoint: a pure function of global shapes, dtypes and the sharding policy.

No I/O and no processes here: any rank that knows the global metadata (every rank does, from DTensor
metadata) computes the same :class:`Layout`, byte for byte. Files are filled in natural FQN order
(``layers.2`` before ``layers.10``); inside a file tensors are ordered by item size, largest first, then
by name, so every tensor starts on a multiple of its own item size (the header is padded to 8 bytes).
:func:`plan` is also where a save is refused before any byte is written: a big-endian host, a repeated
name, the reserved name ``__metadata__``, a dtype or shape the format cannot express.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from . import dtypes, header
from .box import Box
from .errors import LayoutError, UnsupportedEntryError, format_keys

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
RESERVED_NAME = "__metadata__"  # the header key of the file's metadata: no tensor may have this name

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class TensorSpec:
    """Global metadata of one tensor: all a layout needs."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @functools.cached_property  # read many times per tensor per save; a frozen dataclass keeps it valid
    def itemsize(self) -> int:
        return dtypes.itemsize(self.dtype)

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of data. Exact for sub-byte formats too: torch packs them (``float4_e2m1fn_x2`` holds two fp4
        values in a 1-byte element), so torch elements always fill whole bytes."""
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True)
class TensorPlacement:
    spec: TensorSpec
    file: str
    offset: int  # absolute offset of the first data byte in ``file``


@dataclass
class FileLayout:
    name: str
    header: bytes
    size: int
    tensors: list[str] = field(default_factory=list)


@dataclass
class Layout:
    files: list[FileLayout]
    tensors: dict[str, TensorPlacement]
    order: list[str] = field(default_factory=list)  # tensor names in natural order

    @property
    def total_size(self) -> int:
        return sum(p.spec.nbytes for p in self.tensors.values())

    def index(self, extra_metadata: Mapping[str, object] | None = None) -> dict:
        """The ``model.safetensors.index.json`` content."""
        meta: dict[str, object] = {"total_size": self.total_size}
        meta.update(extra_metadata or {})
        names = self.order or sorted(self.tensors, key=natural_key)
        weight_map = {name: self.tensors[name].file for name in names}
        return {"metadata": meta, "weight_map": weight_map}


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs numerically: ``layers.2`` < ``layers.10``; ties (``a01``/``a1``) by name."""
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)
    return parts + ((2, 0, name),)


def parse_size(value: int | str | None) -> int | None:
    """``"5GB"`` -> 5_000_000_000, ``"2GiB"`` -> 2**31, ints pass through; None means no limit."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise LayoutError(f"max_shard_size must be a size such as '5GB' or a byte count, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise LayoutError(f"max_shard_size {value!r} is not a size; use e.g. 5GB, 500MB, 2GiB or a byte count")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise LayoutError(f"max_shard_size must be positive, got {value!r}")
    return n


def file_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def plan(
    specs: Iterable[TensorSpec],
    *,
    max_shard_size: int | str | None = None,
    fqn_to_index_mapping: Mapping[str, int] | None = None,
) -> Layout:
    """Assign every tensor a file and an offset. Deterministic: depends only on its arguments.

    Validates everything a save needs before any byte is written: host byte order, unique names that the
    format can hold, dtypes and shapes it can express.
    """
    dtypes.check_host()
    ordered = sorted(specs, key=lambda s: natural_key(s.name))
    _check_unique(ordered)
    for s in ordered:
        _check_spec(s)
    if fqn_to_index_mapping is not None and max_shard_size is not None:
        raise LayoutError("give either fqn_to_index_mapping or max_shard_size, not both")
    if fqn_to_index_mapping is not None:
        groups = _groups_from_mapping(ordered, fqn_to_index_mapping)
    else:
        groups = _groups_by_size(ordered, parse_size(max_shard_size))
    return _build(groups, [s.name for s in ordered])


def _check_unique(specs: list[TensorSpec]) -> None:
    dup = {name for name, n in Counter(s.name for s in specs).items() if n > 1}
    if dup:
        raise LayoutError(f"tensor names must be unique; repeated: {format_keys(sorted(dup))}")


def _check_spec(s: TensorSpec) -> None:
    """One tensor the format can hold and our reader will accept back."""
    if s.name == RESERVED_NAME:
        raise UnsupportedEntryError(
            f"a tensor is named {RESERVED_NAME!r}, the key safetensors reserves for the header's metadata: the file "
            "would lose either the tensor or the metadata. Rename the key before saving (and back after loading)"
        )
    if len(s.shape) > header.MAX_DIMS:
        raise UnsupportedEntryError(
            f"tensor {s.name!r} has {len(s.shape)} dimensions; hf_storage reads back at most {header.MAX_DIMS} "
            "(the bound that keeps untrusted headers cheap to check). Reshape it before saving"
        )
    dtypes.to_safetensors(s.dtype, s.name)
    dtypes.header_shape(s.dtype, s.shape, s.name)


def _groups_from_mapping(specs: list[TensorSpec], mapping: Mapping[str, int]) -> list[list[TensorSpec]]:
    missing = [s.name for s in specs if s.name not in mapping]
    if missing:
        raise LayoutError(f"fqn_to_index_mapping has no file index for {format_keys(missing)}; map every FQN to 1..N")
    bad = {k: v for k, v in mapping.items() if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1)}
    if bad:
        raise LayoutError(f"fqn_to_index_mapping values must be integers >= 1; bad: {dict(list(bad.items())[:10])}")
    count = max((mapping[s.name] for s in specs), default=1)
    groups: list[list[TensorSpec]] = [[] for _ in range(count)]
    for s in specs:
        groups[mapping[s.name] - 1].append(s)
    return groups


def _groups_by_size(specs: list[TensorSpec], limit: int | None) -> list[list[TensorSpec]]:
    groups: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        if limit is not None and groups[-1] and used + s.nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += s.nbytes
    return groups


def _build(groups: list[list[TensorSpec]], order: list[str]) -> Layout:
    """Groups arrive in natural name order; a stable sort by item size keeps that order within a size."""
    files: list[FileLayout] = []
    tensors: dict[str, TensorPlacement] = {}
    for i, group in enumerate(groups, start=1):
        name = file_name(i, len(groups))
        group = sorted(group, key=lambda s: -s.itemsize)
        entries, pos = [], 0
        for s in group:
            entries.append(
                (s.name, dtypes.to_safetensors(s.dtype), dtypes.header_shape(s.dtype, s.shape), pos, pos + s.nbytes)
            )
            pos += s.nbytes
        head = header.encode(entries)
        files.append(FileLayout(name, head, len(head) + pos, [s.name for s in group]))
        for s, (_, _, _, begin, _) in zip(group, entries):
            tensors[s.name] = TensorPlacement(s, name, len(head) + begin)
    return Layout(files, tensors, order)


def chunk_runs(shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Contiguous runs of a box inside a row-major tensor: :meth:`hf_storage.box.Box.runs`."""
    return Box(tuple(offsets), tuple(sizes)).runs(tuple(shape))
