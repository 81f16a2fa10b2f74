"""CRC-32 of each tensor's bytes, computed as they are written, by ranks that each hold only pieces.

CRC-32 is affine over GF(2): the CRC of a message equals a linear part, which is additive (XOR) over
disjoint pieces placed at their positions with zeros elsewhere, plus a constant that depends only on the
length. So each rank computes, for every tensor, the XOR of its own pieces' linear CRCs, each shifted by
the number of bytes that follow it in the tensor; the coordinator XORs the ranks' contributions and adds
the constant. The result is the standard ``zlib.crc32`` of the tensor's data, with no second read and no
ordering between ranks. Arithmetic is modulo the CRC polynomial, in zlib's bit-reflected representation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

try:  # ISA-L's CRC-32 (carry-less multiply): the same values as zlib.crc32, about 4x faster
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a declared dependency; zlib is the fallback
    from zlib import crc32

_POLY = 0xEDB88320
_ONE = 1 << 31  # the polynomial "1" in reflected representation
_ALL = 0xFFFFFFFF


def _mul(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial."""
    p = 0
    m = _ONE
    while m:
        if a & m:
            p ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
        m >>= 1
    return p


def _powers() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(64):
        table.append(p)
        p = _mul(p, p)
    return table


_X2N = _powers()  # x^(2^k)


@lru_cache(maxsize=4096)
def _shift_factor(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: the effect of appending ``nbytes`` zero bytes."""
    p, k, n = _ONE, 3, nbytes
    while n:
        if n & 1:
            p = _mul(_X2N[k], p)
        n >>= 1
        k += 1
    return p


@lru_cache(maxsize=64)
def _table(factor: int) -> tuple[tuple[int, ...], ...]:
    """Byte-wise tables for multiplying by a fixed factor: four lookups instead of 32 steps."""
    return tuple(tuple(_mul(factor, b << (8 * i)) for b in range(256)) for i in range(4))


@lru_cache(maxsize=4096)
def _py_table(factor: int) -> tuple[list[int], ...]:
    tabs = []
    for i in range(4):
        t = [0] * 256
        for bit in range(8):
            v = _mul(factor, 1 << (8 * i + bit))
            for j in range(1 << bit):
                t[(1 << bit) + j] = t[j] ^ v
        tabs.append(t)
    return tuple(tabs)


def shift(crc: int, nbytes: int) -> int:
    """The linear CRC of ``piece + nbytes zero bytes`` given the linear CRC of ``piece``."""
    if not nbytes or not crc:
        return crc
    t0, t1, t2, t3 = _py_table(_shift_factor(nbytes))
    return t0[crc & 255] ^ t1[(crc >> 8) & 255] ^ t2[(crc >> 16) & 255] ^ t3[crc >> 24]


def linear(buf) -> int:
    """The linear part of the CRC-32 of ``buf`` (zero initial register, no final XOR)."""
    return crc32(buf, _ALL) ^ _ALL


@lru_cache(maxsize=4096)
def _affine(length: int) -> int:
    return _mul(_shift_factor(length), _ALL) ^ _ALL


def finalize(linear_crc: int, length: int) -> int:
    """The standard CRC-32 (``zlib.crc32``) of a ``length``-byte message from its linear part."""
    return linear_crc ^ _affine(length)


@lru_cache(maxsize=256)
def _np_table(factor: int) -> np.ndarray:
    """(4, 256) table: multiplying x by ``factor`` is the XOR of four lookups, one per byte of x."""
    tab = np.zeros((4, 256), dtype=np.uint32)
    for i in range(4):
        for bit in range(8):
            v = _mul(factor, 1 << (8 * i + bit))
            tab[i, 1 << bit : 2 << bit] = tab[i, : 1 << bit] ^ np.uint32(v)
    return tab


def fold_uniform(raws: np.ndarray, step: int) -> int:
    """XOR of ``raws[k]`` shifted by ``(n-1-k) * step`` bytes: equally spaced pieces, in a log-depth tree."""
    factor = _shift_factor(step)
    r = raws.astype(np.uint32, copy=False)
    while len(r) > 1:
        if len(r) % 2:
            r = np.concatenate([np.zeros(1, dtype=np.uint32), r])  # a leading zero piece changes nothing
        pairs = r.reshape(-1, 2)
        tab = _np_table(factor)
        left = pairs[:, 0]
        r = (
            tab[0][left & 255]
            ^ tab[1][(left >> 8) & 255]
            ^ tab[2][(left >> 16) & 255]
            ^ tab[3][left >> 24]
            ^ pairs[:, 1]
        )
        factor = _mul(factor, factor)
    return int(r[0]) if len(r) else 0


class Accumulator:
    """Folds the runs of one chunk, in increasing file order, into a tensor-level contribution."""

    __slots__ = ("acc", "end")

    def __init__(self) -> None:
        self.acc = 0
        self.end = -1  # tensor-relative byte offset one past the last run folded

    def add_runs(self, mv: memoryview, starts: list[int], run: int) -> None:
        """``mv`` holds the runs back to back; ``starts`` are their tensor-relative byte offsets."""
        if not starts or run == 0:
            return
        n = len(starts)
        if (
            n > 64
            and starts[1] - starts[0] >= run
            and all(starts[i + 1] - starts[i] == starts[1] - starts[0] for i in range(n - 1))
        ):
            raws = np.fromiter(
                (crc32(mv[i * run : (i + 1) * run], _ALL) for i in range(n)), dtype=np.uint32, count=n
            ) ^ np.uint32(_ALL)
            seg = fold_uniform(raws, starts[1] - starts[0])
            last_end = starts[-1] + run
            self.acc = seg if self.end < 0 else shift(self.acc, last_end - self.end) ^ seg
            self.end = last_end
            return
        acc, end = self.acc, self.end
        k = 0
        if end < 0:
            acc, end, k = linear(mv[:run]), starts[0] + run, 1
        use_table = len(starts) - k > 64
        last_step = -1
        tab: tuple[tuple[int, ...], ...] = ()  # the shift table for last_step, built on first use
        for i in range(k, len(starts)):
            step = starts[i] + run - end
            if use_table:
                if step != last_step:
                    tab, last_step = _table(_shift_factor(step)), step
                acc = tab[0][acc & 255] ^ tab[1][(acc >> 8) & 255] ^ tab[2][(acc >> 16) & 255] ^ tab[3][acc >> 24]
            else:
                acc = shift(acc, step)
            acc ^= linear(mv[i * run : (i + 1) * run])
            end = starts[i] + run
        self.acc, self.end = acc, end

    def contribution(self, tensor_nbytes: int) -> int:
        """This chunk's share of the tensor's linear CRC (XOR the shares of all chunks)."""
        return 0 if self.end < 0 else shift(self.acc, tensor_nbytes - self.end)
