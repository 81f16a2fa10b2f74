"""One rank of an object-store save, run under torchrun by tests/test_s3_save.py.

    torchrun --standalone --nproc-per-node=2 --max-restarts=0 -m tests.s3_worker \\
        --uri s3://bucket/ckpt --out /tmp/run --fault kill --fault-rank 1

Saves :func:`state` (row-, column- and un-sharded tensors over several files) with ``hf_storage.save``.
``--fault kill|error`` on ``--fault-rank`` fires right after that rank's first part upload returned (the
store is real; only our own function is wrapped): ``kill`` SIGKILLs the process, ``error`` raises. Each
rank writes ``OUT/rank<R>.json`` with its outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch
import torch.distributed as dist

import hf_storage
import hf_storage.objstore as hobjstore

MAX_SHARD = "6MB"


def state(mesh=None) -> dict[str, torch.Tensor]:
    """The full tensors, or (given a 1-D mesh) their DTensors: rows, columns, replicated and plain."""
    g = torch.Generator().manual_seed(7)
    full = {
        "embed.weight": torch.randn(1500, 1024, generator=g).to(torch.bfloat16),  # 3 MB, rows
        "layers.0.q.weight": torch.randn(1024, 1536, generator=g).to(torch.bfloat16),  # 3 MB, columns
        "layers.0.norm.weight": torch.randn(1024, generator=g),  # replicated
        "lm_head.weight": torch.randn(700, 2048, generator=g),  # 5.7 MB, rows
        "step": torch.arange(3, dtype=torch.int64),  # plain
    }
    if mesh is None:
        return full
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    place = {"embed.weight": Shard(0), "layers.0.q.weight": Shard(1), "layers.0.norm.weight": Replicate()}
    place["lm_head.weight"] = Shard(0)
    return {k: distribute_tensor(v, mesh, [place[k]]) if k in place else v for k, v in full.items()}


def _inject(fault: str) -> None:
    real = hobjstore.upload_part

    def upload_part(*args, **kwargs):
        real(*args, **kwargs)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure after a part upload")

    hobjstore.upload_part = upload_part  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uri", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fault", default="none", choices=["none", "kill", "error"])
    ap.add_argument("--fault-rank", type=int, default=1)
    ap.add_argument("--lock-wait", type=float, default=0.0)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if args.fault != "none" and rank == args.fault_rank:
        _inject(args.fault)
    result: dict = {"rank": rank}
    try:
        hf_storage.save(state(mesh), args.uri, max_shard_size=MAX_SHARD, lock_wait=args.lock_wait)
        result["outcome"] = "ok"
    except Exception as e:
        result.update(outcome="error", type=type(e).__name__, message=str(e))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
