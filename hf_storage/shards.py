"""The exact elements a rank holds of each tensor: one or more :class:`Box` pieces per local shard.

A DTensor's placements split each tensor dimension independently: the mesh dimensions that shard
dimension ``d`` cut its index range one after another (left to right, or in the spec's ``shard_order``),
each with torch's own split (``Shard`` chunks, ``_StridedShard`` interleaves). So this module runs those
same splits on an index vector per dimension and reads the result back as runs of consecutive indices:
a shard that is one block (``Shard``, the FSDP-over-TP ``_StridedShard``) is one piece; rows
{0, 2} of ``(Shard(0), _StridedShard(0, 2))`` are two. Replicated data is written once, by coordinate 0 of
every replicated mesh dimension; ``Partial`` placements are refused.

:func:`check_cover` proves, from the placements alone, that the pieces of every mesh coordinate cover
each tensor exactly once; with the per-tensor byte tallies of the writers this is the save's coverage check.
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref
from collections.abc import Sequence
from typing import NamedTuple, TypeGuard

import numpy as np
import torch

from .box import Box
from .errors import UnsupportedEntryError

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Partial = Replicate = Shard = _StridedShard = None  # type: ignore[assignment,misc]


class Piece(NamedTuple):
    """Elements ``box`` of the global tensor, held at ``local`` in this rank's local tensor."""

    box: Box
    local: Box


class Shards(NamedTuple):
    """A tensor as this rank holds it: local data, its pieces, and whether this rank writes them."""

    data: torch.Tensor
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    writes: bool
    problem: str | None = None  # why the pieces of all mesh coordinates do not cover the tensor exactly once


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(t, DTensor)


def of(t: torch.Tensor, rank: int = 0) -> Shards:
    """The pieces of ``t``: its local shard's for a DTensor; for a plain tensor, the whole of it (written by
    ``rank`` 0 of the save)."""
    shape = tuple(t.shape)
    if is_dtensor(t):
        spec = t._spec
        placements = tuple(spec.placements)
        order = _order(spec) if _stacked(placements) else None  # torch computes shard_order on every access
        mesh = _mesh_key(spec.mesh)
        pieces, writes = _pieces(shape, mesh, placements, order)
        return Shards(t._local_tensor, shape, pieces, writes, _cover(shape, placements, mesh.shape, order))
    whole = Box.whole(shape)
    return Shards(t, shape, (Piece(whole, whole),), rank == 0)


class MeshKey(NamedTuple):
    """What the pieces need of a mesh, as plain values: the caches below must not keep a ``DeviceMesh`` (and
    through it the process groups) alive after ``destroy_process_group``, or their threads outlive the process
    group and abort the interpreter at exit."""

    shape: tuple[int, ...]
    coordinate: tuple[int, ...] | None
    first_sibling: bool


_MESHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mesh_key(mesh) -> MeshKey:
    """``mesh``'s key, computed once while the mesh lives (``mesh.shape`` alone costs 12 us in torch 2.13)."""
    key = _MESHES.get(mesh)
    if key is None:
        coord = mesh.get_coordinate()
        key = MeshKey(tuple(mesh.shape), tuple(coord) if coord is not None else None, _first_sibling(mesh))
        _MESHES[mesh] = key
    return key


def pieces_of(shape: tuple[int, ...], mesh, placements: tuple) -> tuple[Piece, ...]:
    """This rank's pieces of a tensor of ``shape`` laid out by ``placements`` on ``mesh`` (a DTensor to be)."""
    return _pieces(tuple(shape), _mesh_key(mesh), tuple(placements), None)[0]


def view(data: torch.Tensor, local: Box) -> torch.Tensor:
    """The part of ``data`` (a local shard) that ``local`` names."""
    out = data
    for d, (o, s) in enumerate(zip(local.offsets, local.sizes)):
        if o or s != out.shape[d]:
            out = out.narrow(d, o, s)
    return out


def describe(t: torch.Tensor) -> str:
    """Placements and mesh of a DTensor, for error messages."""
    if not is_dtensor(t):
        return "a plain tensor"
    spec = t._spec
    return f"placements {tuple(spec.placements)} on a mesh of shape {tuple(spec.mesh.shape)}"


@functools.lru_cache(maxsize=256)
def _stacked(placements: tuple) -> bool:
    """Whether some tensor dimension is split by more than one mesh dimension (only then does order matter)."""
    dims = [p.dim for p in placements if isinstance(p, (Shard, _StridedShard))]
    return len(dims) != len(set(dims))


def _order(spec) -> tuple | None:
    """The spec's explicit shard order, when it has one that is not the left-to-right default."""
    order = getattr(spec, "shard_order", None)
    if not order or getattr(spec, "use_strided_shard_as_shard_order", False):
        return None
    return tuple((e.tensor_dim, tuple(e.mesh_dims)) for e in order)


def _sharding(placements: tuple, order: tuple | None, ndim: int) -> list[list[int]]:
    """For each tensor dimension, the mesh dimensions that split it, in the order they apply."""
    by_dim: list[list[int]] = [[] for _ in range(ndim)]
    for m, p in enumerate(placements):
        if isinstance(p, Partial):
            raise UnsupportedEntryError(
                "a DTensor with a Partial placement holds unreduced values; redistribute it to Shard or "
                "Replicate (e.g. dtensor.redistribute(placements=[Replicate()])) before saving"
            )
        if isinstance(p, (Shard, _StridedShard)):  # _StridedShard is not a Shard subclass in every torch
            by_dim[p.dim if p.dim >= 0 else p.dim + ndim].append(m)
    for tensor_dim, mesh_dims in order or ():
        by_dim[tensor_dim] = list(mesh_dims)
    return by_dim


@functools.lru_cache(maxsize=4096)
def _pieces(
    shape: tuple[int, ...], mesh: MeshKey, placements: tuple, order: tuple | None
) -> tuple[tuple[Piece, ...], bool]:
    """This rank's pieces of a tensor of ``shape`` and whether it writes them; cached, since a model repeats
    a few layouts many times."""
    coord = mesh.coordinate
    if coord is None:  # this rank is not in the mesh: it holds nothing
        return (), False
    by_dim = _sharding(placements, order, len(shape))
    writes = all(c == 0 for c, p in zip(coord, placements) if isinstance(p, Replicate)) and mesh.first_sibling
    sizes = mesh.shape
    runs = [_runs(_indices(n, tuple((placements[m], sizes[m], coord[m]) for m in ms))) for n, ms in zip(shape, by_dim)]
    out = []
    for combo in itertools.product(*runs):
        box = Box(tuple(g for g, _, _ in combo), tuple(n for _, _, n in combo))
        out.append(Piece(box, Box(tuple(lo for _, lo, _ in combo), box.sizes)))
    if not shape:
        out = [Piece(Box((), ()), Box((), ()))]
    return tuple(out), writes


def _first_sibling(mesh) -> bool:
    """False on a submesh (``mesh["dp"]`` of a 2-D mesh) other than the one at coordinate 0 of the root mesh's
    other dimensions: the sibling submeshes hold copies of the same tensor, which is written once."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    if root is None or root is mesh or root.mesh.numel() == mesh.mesh.numel():
        return True
    grid = root.mesh
    where = [tuple(int(i) for i in (grid == r).nonzero()[0]) for r in mesh.mesh.flatten().tolist()]
    here = where[mesh.mesh.flatten().tolist().index(mesh.get_rank())]
    fixed = [d for d in range(grid.dim()) if len({w[d] for w in where}) == 1]
    return all(here[d] == 0 for d in fixed)


def _split(n: int, splits: tuple) -> np.ndarray:
    """Global indices, in local order, that the splits ``(placement, mesh size, coordinate)`` leave of ``range(n)``:
    torch's own ``_split_tensor`` of each placement, applied to an index vector."""
    idx = torch.arange(n, dtype=torch.int64)
    for p, size, c in splits:
        idx = _cut(p)._split_tensor(idx, size, with_padding=False, contiguous=True)[0][c]
    return idx.numpy()


def _cut(p):
    """The placement's split along dimension 0 of an index vector."""
    return _StridedShard(0, split_factor=p.split_factor) if isinstance(p, _StridedShard) else Shard(0)


_indices = functools.lru_cache(maxsize=4096)(_split)


def _runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """``(global start, local start, length)`` of each run of consecutive indices."""
    if len(idx) == 0:
        return [(0, 0, 0)]
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(idx)]))
    return [(int(idx[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


def check_cover(name: str, t: torch.Tensor) -> str | None:
    """None if the writers of ``t``'s pieces, over every mesh coordinate, cover each element exactly once;
    else what is wrong (plain tensors are whole by definition)."""
    problem = of(t).problem
    return f"tensor {name!r} ({describe(t)}): {problem}" if problem else None


@functools.lru_cache(maxsize=4096)
def _cover(shape: tuple[int, ...], placements: tuple, mesh_shape: tuple[int, ...], order: tuple | None) -> str | None:
    by_dim = _sharding(placements, order, len(shape))
    for d, (n, ms) in enumerate(zip(shape, by_dim)):
        problem = _dim_cover(n, tuple((placements[m], mesh_shape[m]) for m in ms))
        if problem:
            return f"dimension {d} of size {n}: {problem}"
    return None


@functools.lru_cache(maxsize=4096)
def _dim_cover(n: int, splits: tuple) -> str | None:
    """Whether the index sets of every coordinate combination of ``splits`` partition ``range(n)``. The
    splits are applied level by level, each set cut once into its children: O(levels x n) however many
    ranks there are, not ranks x n."""
    sets = [torch.arange(n, dtype=torch.int64)]
    for p, size in splits:
        cut = _cut(p)
        sets = [part for s in sets for part in cut._split_tensor(s, size, with_padding=False, contiguous=True)[0]]
    held = np.concatenate([s.numpy() for s in sets]) if sets else np.empty(0, dtype=np.int64)
    seen = np.bincount(held, minlength=n)
    if (seen == 1).all():
        return None
    twice, never = np.flatnonzero(seen > 1), np.flatnonzero(seen == 0)
    return (
        f"{len(twice)} indices held twice (first {twice[:5].tolist()}), "
        f"{len(never)} held by no rank (first {never[:5].tolist()})"
    )


def total(pieces: Sequence[Piece]) -> int:
    return sum(math.prod(p.box.sizes) for p in pieces)
