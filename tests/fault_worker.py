"""One rank of a fault-injection save, run under torchrun by tests/test_faults.py.

    torchrun --standalone --nproc-per-node=2 --max-restarts=0 -m tests.fault_worker \\
        --path /ckpt/x --out /tmp/run --api save --gen 2 --fault write:kill --fault-rank 1

Builds a small deterministic sharded state dict (DTensors on a 1-D CPU mesh, plus one plain tensor), then
saves it with ``hf_storage.save`` (``--api save``), ``hf_storage.async_save`` (``--api async``) or
``dcp.save`` + ``HuggingFaceStorageWriter`` (``--api dcp``). A fault is injected in-process by wrapping
library functions (the library is not changed). ``--fault POINT:ACTION`` on ``--fault-rank``:

    POINT   create  on entry to ``pipeline.create_files`` (rank 0 only: the staging dir exists, no files yet)
            write   in the write phase, after this rank's first data ``pwrite`` (``engine.pwrite_all``)
            report  after this rank's ``pipeline.write`` returned, before it reports to rank 0
            publish on entry to ``publish.publish`` (rank 0 only: every file and the index are staged)
            swap    inside ``publish.publish`` on a filesystem without ``renameat2(RENAME_EXCHANGE)`` (NFS,
                    Lustre): after the old directory was renamed to ``.<name>.old``, before the staging
                    directory is renamed into place (rank 0 only)
    ACTION  kill    SIGKILL this process
            enospc  raise OSError(ENOSPC) (from the pwrite at ``write``)
            error   raise RuntimeError (a plain Python failure)
            hang    sleep for an hour (a stuck filesystem)

``--first-attempt-only`` injects only when ``TORCHELASTIC_RESTART_COUNT`` is 0. Each rank writes
``OUT/rank<R>.a<attempt>.json`` (outcome, exception type and message, start time) and ``OUT/pid.r<R>.a<attempt>``;
an exception is re-raised so its traceback reaches stderr and the exit code. Just before a fault fires,
``OUT/fault.json`` records when and where.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import hf_storage
import hf_storage.engine as hengine
import hf_storage.pipeline as hpipeline
import hf_storage.publish as hpublish

MAX_SHARD = 400  # bytes: the small state dict spans several files

# name -> (shape, dtype, placement): "S0"/"S1" shard that dim over the mesh, "R" replicate, None plain.
SMALL = {
    "embed.weight": ((12, 8), torch.float32, "S0"),
    "layers.0.attn.q.weight": ((8, 12), torch.bfloat16, "S1"),
    "layers.0.norm.weight": ((8,), torch.float32, "R"),
    "lm_head.weight": ((12, 8), torch.float16, "S0"),
    "step": ((6,), torch.int64, None),
}
BIG = {"big.weight": ((1024, 1024), torch.float32, "S0")}  # 4 MiB, for the 1 MiB tmpfs
TINY = {"tiny.weight": ((6, 4), torch.float32, "S0")}  # a previous checkpoint that fits the tmpfs
SPECS = {"small": SMALL, "big": BIG, "tiny": TINY}


def expected(kind: str, gen: int) -> dict[str, torch.Tensor]:
    """The full tensors of generation ``gen`` (different bits for every generation)."""
    out = {}
    for i, (name, (shape, dtype, _)) in enumerate(SPECS[kind].items()):
        g = torch.Generator().manual_seed(1000 * gen + i)
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g).to(dtype)
        else:
            out[name] = torch.randint(-(2**40), 2**40, shape, generator=g, dtype=dtype)
    return out


def state_dict(kind: str, gen: int, mesh) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    sd = {}
    for name, full in expected(kind, gen).items():
        place = SPECS[kind][name][2]
        if place is None:
            sd[name] = full
        else:
            p = Replicate() if place == "R" else Shard(int(place[1]))
            sd[name] = distribute_tensor(full, mesh, [p])
    return sd


class Fault:
    def __init__(self, spec: str | None, rank: int, out: str):
        self.point, self.action = spec.split(":") if spec else (None, None)
        self.rank, self.out = rank, out
        self.writing = False

    def fire(self, point: str) -> None:
        if point != self.point:
            return
        with open(os.path.join(self.out, "fault.json"), "w") as f:
            json.dump({"time": time.time(), "rank": dist.get_rank(), "point": point, "action": self.action}, f)
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "hang":
            time.sleep(3600)
        if self.action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.action == "error":
            raise RuntimeError("injected failure: the disk controller gave up")

    def install(self) -> None:
        """Wrap the library functions at the fault point (module attributes are looked up at call time)."""
        create, write, pwrite_all, publish = (
            hpipeline.create_files,
            hpipeline.write,
            hengine.pwrite_all,
            hpublish.publish,
        )

        def create_files(*a, **k):
            self.fire("create")
            return create(*a, **k)

        def chunks(*a, **k):
            self.writing = True
            try:
                results = write(*a, **k)
            finally:
                self.writing = False
            self.fire("report")
            return results

        def pwrite(*a, **k):
            pwrite_all(*a, **k)
            if self.writing:
                self.fire("write")

        def publish_(*a, **k):
            self.fire("publish")
            return publish(*a, **k)

        if self.point == "swap":
            hpublish._swap = lambda a, b: False  # renameat2(RENAME_EXCHANGE) unsupported here
            hpublish.os = _RenameHook(lambda dst: self.fire("swap") if str(dst).endswith(".old") else None)

        hpipeline.create_files = create_files
        hpipeline.write = chunks
        hengine.pwrite_all = pwrite
        hpublish.publish = publish_


class _RenameHook:
    """Stands in for ``os`` inside hf_storage.publish only: ``rename`` calls ``after(dst)`` once it is done."""

    def __init__(self, after):
        self._after = after

    def __getattr__(self, name):
        return getattr(os, name)

    def rename(self, src, dst, *a, **k):
        os.rename(src, dst, *a, **k)
        self._after(dst)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--api", choices=("save", "dcp", "async"), default="save")
    ap.add_argument("--kind", choices=tuple(SPECS), default="small")
    ap.add_argument("--gen", type=int, default=1)
    ap.add_argument("--fault", default=None)
    ap.add_argument("--fault-rank", type=int, default=1)
    ap.add_argument("--first-attempt-only", action="store_true")
    ap.add_argument("--pg-timeout", type=float, default=30.0)
    return ap.parse_args(argv)


def save(args, mesh) -> None:
    sd = state_dict(args.kind, args.gen, mesh)
    shard = MAX_SHARD if args.kind == "small" else None
    if args.api == "save":
        hf_storage.save(sd, args.path, max_shard_size=shard, thread_count=2)
    elif args.api == "async":  # the fault fires on the background thread
        hf_storage.async_save(sd, args.path, max_shard_size=shard, thread_count=2).result()
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save(sd, storage_writer=hf_storage.HuggingFaceStorageWriter(args.path, max_shard_size=shard))


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.pg_timeout))
    rank, attempt = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    inject = rank == args.fault_rank and not (args.first_attempt_only and attempt > 0)
    Fault(args.fault if inject else None, rank, args.out).install()
    with open(os.path.join(args.out, f"pid.r{rank}.a{attempt}"), "w") as f:
        f.write(str(os.getpid()))  # for the test's clean-up, should this run hang
    record = {"rank": rank, "attempt": attempt, "t0": time.time()}
    try:
        save(args, mesh)
    except BaseException as e:
        record.update(status="error", type=type(e).__name__, message=str(e))
        raise
    else:
        record.update(status="ok")
    finally:
        with open(os.path.join(args.out, f"rank{rank}.a{attempt}.json"), "w") as f:
            json.dump(record, f)
    dist.barrier()  # no rank tears down its gloo connections while a peer is still finishing
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
