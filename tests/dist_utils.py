"""Run a function on N gloo ranks (CPU) in spawned processes; re-raise the first rank failure."""

from __future__ import annotations

import os
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            queue.put((rank, "ok", fn(rank, world_size, *args)))
            dist.barrier()  # no rank tears down its gloo connections while a peer is still finishing
        finally:
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Call ``fn(rank, world_size, *args)`` on every rank; return the per-rank results in rank order.

    ``fn`` must be a module-level function (it is pickled into the spawned processes).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    results = {}
    while not queue.empty():
        rank, status, value = queue.get()
        if status == "error":
            raise AssertionError(f"rank {rank} failed:\n{value}")
        results[rank] = value
    if alive:
        raise AssertionError(f"{len(alive)} ranks still running after {timeout}s (hang?)")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        codes = [p.exitcode for p in procs]
        raise AssertionError(f"ranks {missing} reported nothing (exit codes {codes})")
    return [results[r] for r in range(world_size)]
