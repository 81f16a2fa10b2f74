"""The collectives of a save, on the caller's process group only, and the rule for failing mid-way.

:class:`Group` is the one wrapper over ``torch.distributed`` the package uses: ranks and sizes come from
the group the caller gave (the default group when none), never from the world; outside a process group
every call is a local no-op. :class:`FirstError` is the one way a rank that failed keeps its peers from
waiting on it: remember the first error, skip the remaining work, keep attending, raise at the end.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import PeerFailure

T = TypeVar("T")


class Group:
    """``all_gather`` / ``broadcast`` / ``gather`` of picklable messages over ``group`` (None: the default)."""

    def __init__(self, group: Any = None) -> None:
        self.on = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.on else 0
        self.size = dist.get_world_size(group) if self.on else 1

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def all_gather(self, obj: T) -> list[T]:
        if not self.on:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self._global(0), group=self.group)
        return box[0]

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere). A monitored barrier first names ranks that never come."""
        if not self.on:
            return [obj]
        self.barrier()
        out: list | None = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=self._global(0), group=self.group)
        return out

    def barrier(self) -> None:
        """On gloo, a monitored barrier that names the ranks that never arrive; else torch's barrier.
        Raises :class:`PeerFailure`."""
        if not self.on:
            return
        try:
            if dist.get_backend(self.group) == "gloo":
                dist.monitored_barrier(self.group, timeout=self.timeout(), wait_all_ranks=True)
            else:
                dist.barrier(group=self.group)
        except RuntimeError as e:
            m = re.search(r"Ranks? ([\d, ]+) failed", str(e))
            who = f"rank {m.group(1).strip()} did not finish in time (killed or stuck in I/O)" if m else str(e)
            raise PeerFailure(f"the save could not complete: {who}; nothing was published ({e})") from e

    def timeout(self) -> timedelta | None:
        """The timeout the group was created with (None when unknown: torch's defaults apply)."""
        return timeout_of(self.group) if self.on else None


def timeout_of(group: Any = None) -> timedelta | None:
    """A process group's collective timeout (``group`` None: the default group), None when unknown."""
    try:
        pg = group if group is not None else dist.group.WORLD
        if pg is None:  # no default group
            return None
        return pg._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # private API moved, or no group: torch's defaults apply
        return None


class FirstError:
    """Remember the first local error and skip later work, so the rank keeps attending every collective and
    barrier (its peers would otherwise wait for it until the timeout); raise it once they are done.

    A :class:`PeerFailure` is never held: a peer is gone, no collective can complete, it surfaces at once.
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def attempt(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)`` unless an error happened already; an exception is remembered, not raised."""
        if self.error is not None:
            return None
        return self.always(fn, *args)

    def always(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)`` even after an error (draining I/O, closing files); its own error is kept only if first."""
        try:
            return fn(*args)
        except PeerFailure:
            raise
        except Exception as e:
            if self.error is None:
                self.error = e
            return None

    def raise_first(self) -> None:
        if self.error is not None:
            raise self.error
