"""The one synchronisation primitive the writers add to torch's: a barrier that names missing ranks."""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from .errors import PeerFailure


def pg_timeout(group):
    """The timeout the process group was created with (monitored_barrier's own default is 30 minutes)."""
    try:
        pg = group if group is not None else dist.group.WORLD
        return pg._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # private API moved: fall back to torch's default
        return None


def barrier(group=None) -> None:
    """On gloo, a monitored barrier: it names the ranks that never arrive (killed, stuck in I/O) instead of
    a bare timeout; elsewhere torch's barrier. Raises :class:`PeerFailure`."""
    try:
        if dist.get_backend(group) == "gloo":
            dist.monitored_barrier(group, timeout=pg_timeout(group), wait_all_ranks=True)
        else:
            dist.barrier(group=group)
    except RuntimeError as e:
        m = re.search(r"Ranks? ([\d, ]+) failed", str(e))
        who = f"rank {m.group(1).strip()} did not finish writing in time (killed or stuck in I/O)" if m else str(e)
        raise PeerFailure(f"the save could not complete: {who}; nothing was published ({e})") from e
