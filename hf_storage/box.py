"""``Box``: a block of a row-major tensor, given by its global ``offsets`` and ``sizes``. One value type
for a shard's element box everywhere (the engine, row assembly, the reader, the launcher), with its
arithmetic in one place: bytes, contiguous runs, row slices and overlaps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .errors import LayoutError


class Box(NamedTuple):
    """Elements ``[offsets[d], offsets[d] + sizes[d])`` of every dimension ``d`` of a tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> Box:
        return cls((0,) * len(shape), tuple(shape))

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def nbytes(self, itemsize: int) -> int:
        return self.numel * itemsize

    @property
    def empty(self) -> bool:
        return 0 in self.sizes

    def rows(self, first: int, count: int) -> Box:
        """Rows ``[first, first + count)`` of this box (counted from the box's own first row)."""
        if not self.sizes:
            return self
        return Box((self.offsets[0] + first, *self.offsets[1:]), (count, *self.sizes[1:]))

    def overlap(self, other: Box) -> Box | None:
        """The elements both boxes hold, or None (a 0-dim box always overlaps another 0-dim box)."""
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a + s, b + t) for a, s, b, t in zip(self.offsets, self.sizes, other.offsets, other.sizes))
        if any(h <= low for low, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - low for low, h in zip(lo, hi)))

    def relative_to(self, origin: Box) -> Box:
        """This box's offsets counted from ``origin``'s first element (a box inside ``origin``)."""
        return Box(tuple(o - b for o, b in zip(self.offsets, origin.offsets)), self.sizes)

    def check(self, shape: tuple[int, ...]) -> None:
        if len(shape) != len(self.offsets) or len(shape) != len(self.sizes):
            raise LayoutError(f"box offsets {self.offsets} / sizes {self.sizes} do not match shape {shape}")
        if any(s < 0 or o < 0 or o + s > d for d, o, s in zip(shape, self.offsets, self.sizes)):
            raise LayoutError(f"box offsets {self.offsets} sizes {self.sizes} fall outside shape {shape}")

    def single_run(self, shape: tuple[int, ...]) -> int | None:
        """Element offset of a box that is one contiguous run of its tensor (row shard, whole tensor), else None."""
        sizes, offsets = self.sizes, self.offsets
        k = len(shape) - 1
        while k >= 0 and sizes[k] == shape[k]:
            k -= 1
        for d in range(k):  # plain loops: this runs once per tensor of a save (50,000 small ones in MoE)
            if sizes[d] != 1:
                return None
        start, stride = 0, 1
        for d in range(len(shape) - 1, -1, -1):
            start += offsets[d] * stride
            stride *= shape[d]
        return start

    def runs(self, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
        """Contiguous runs of the box inside the tensor: ``(starts, length)`` in elements.

        Read in row-major order, the box is the concatenation of ``[start, start + length)`` for each start:
        one run for a row shard, one per row for a column shard.
        """
        self.check(shape)
        if self.empty:
            return np.empty(0, dtype=np.int64), 0
        st = strides(shape)
        k = _last_partial_dim(shape, self.sizes)
        if k < 0:
            return np.zeros(1, dtype=np.int64), math.prod(shape)
        length = self.sizes[k] * st[k]
        starts = np.array([sum(o * s for o, s in zip(self.offsets, st))], dtype=np.int64)
        for i in range(k):
            if self.sizes[i] > 1:
                starts = np.add.outer(starts, np.arange(self.sizes[i], dtype=np.int64) * st[i]).ravel()
        return starts, length

    def short_runs(self, shape: tuple[int, ...], itemsize: int, limit: int) -> bool:
        """True for a box of many runs shorter than ``limit`` bytes (a column shard)."""
        if len(shape) < 2 or self.empty or self.single_run(shape) is not None:
            return False
        k = _last_partial_dim(shape, self.sizes)
        return self.sizes[k] * math.prod(shape[k + 1 :]) * itemsize < limit


def strides(shape: tuple[int, ...]) -> list[int]:
    """Row-major element strides of ``shape``."""
    out = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        out[d] = out[d + 1] * shape[d + 1]
    return out


def _last_partial_dim(shape: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """The last dimension the box does not span whole (-1 when it spans every dimension)."""
    k = len(shape) - 1
    while k >= 0 and sizes[k] == shape[k]:
        k -= 1
    return k
