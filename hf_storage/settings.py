"""Every ``HF_STORAGE_*`` environment setting, read here and nowhere else (each is read when used, so a
test or a launcher may set it before a save).

=========================  ========  ==================================================================
``HF_STORAGE_MMAP``        ``1``     ``0``: plain ``pread``/``pwrite`` only, never file mappings
``HF_STORAGE_ROW_ASSEMBLY`` ``1``    ``0``: column shards are written by their own ranks, row by row
``HF_STORAGE_NODE``        (unset)   the node name row assembly groups ranks by (default: host name and
                                     kernel PID namespace); tests set it to simulate several nodes
``HF_STORAGE_ASYNC_OVERLAP`` ``auto``  async saves: ``1`` write each chunk while the next ones are still copied, ``0``
                                     write once every copy is made; ``auto``: overlap where each local rank has
                                     two cores or more (the writes then do not slow the copy down)
``HF_STORAGE_PART_SIZE``   16 MiB    object stores: bytes per multipart-upload part (>= 5 MiB; grown so
                                     that no file needs more than 10,000 parts)
``HF_STORAGE_S3_ATTEMPTS`` ``10``    object stores: attempts per request, retries with backoff included
``HF_STORAGE_S3_LEASE``    ``60``    object stores: seconds a save's lock outlives its last renewal (a
                                     SIGKILLed save blocks the next save of its prefix this long at most)
=========================  ========  ==================================================================
"""

from __future__ import annotations

import os


def mapping() -> bool:
    """File mappings for short runs, unless ``HF_STORAGE_MMAP=0``."""
    return os.environ.get("HF_STORAGE_MMAP", "1") != "0"


def row_assembly() -> bool:
    """Row assembly of column shards, unless ``HF_STORAGE_ROW_ASSEMBLY=0`` (or its old name
    ``HF_STORAGE_EXCHANGE=0``)."""
    return os.environ.get("HF_STORAGE_ROW_ASSEMBLY", os.environ.get("HF_STORAGE_EXCHANGE", "1")) != "0"


def node() -> str | None:
    """``HF_STORAGE_NODE``, when set."""
    return os.environ.get("HF_STORAGE_NODE") or None


def s3_attempts() -> int:
    """``HF_STORAGE_S3_ATTEMPTS``: attempts per object-store request, retries included (default 10)."""
    return max(1, int(os.environ.get("HF_STORAGE_S3_ATTEMPTS", "10")))


def part_size() -> int:
    """``HF_STORAGE_PART_SIZE``: bytes per multipart-upload part (default 16 MiB; at least 5 MiB, the stores'
    minimum)."""
    value = int(os.environ.get("HF_STORAGE_PART_SIZE", str(16 * 2**20)))
    if value < 5 * 2**20:
        raise ValueError(f"HF_STORAGE_PART_SIZE={value} is below the object stores' 5 MiB minimum part size")
    return value


def s3_lease() -> float:
    """``HF_STORAGE_S3_LEASE``: seconds an object-store save's lock lasts without renewal (default 60): a save
    killed by SIGKILL blocks the next save of its prefix for at most this long."""
    return float(os.environ.get("HF_STORAGE_S3_LEASE", "60"))


def async_overlap(local_ranks: int) -> bool:
    """``HF_STORAGE_ASYNC_OVERLAP`` (``auto``, ``1`` or ``0``): whether an async save writes chunks while the
    foreground still copies the next ones. ``auto``: where this process has two cores or more per local rank."""
    value = os.environ.get("HF_STORAGE_ASYNC_OVERLAP", "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"HF_STORAGE_ASYNC_OVERLAP={value!r}: use auto, 1 or 0")
    if value != "auto":
        return value == "1"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= 2 * max(1, local_ranks)
