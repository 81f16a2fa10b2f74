"""Saves to an object store: a real S3-compatible server (moto's, over HTTP on 127.0.0.1) and boto3, nothing
patched in-process. Every checkpoint written to the store is compared byte for byte with the same save to a
local directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import hf_storage
from hf_storage import objstore
from hf_storage.errors import CheckpointExistsError, CheckpointLockedError
from tests.dist_utils import run_ranks
from tests.launcher_utils import ROOT, run, torchrun_cmd
from tests.s3_server import s3_client
from tests.s3_worker import state as worker_state

PART = str(5 * 2**20)  # the stores' minimum part size: small files still span several parts


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch):
    monkeypatch.setenv("HF_STORAGE_PART_SIZE", PART)


def objects(uri: str) -> dict[str, bytes]:
    """Every object directly under the prefix, by name."""
    loc = objstore.Location.parse(uri)
    c = s3_client()
    out = {}
    for name in objstore.listing(loc):
        out[name] = c.get_object(Bucket=loc.bucket, Key=loc.key(name))["Body"].read()
    return out


def local_files(path: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


def unpinned(files: dict[str, bytes]) -> dict[str, bytes]:
    """A checkpoint's files with the index's ``object_etags`` (which only saves to a store write) removed."""
    index = json.loads(files[INDEX])
    etags = index["metadata"].pop("object_etags", None)
    if etags is not None:
        assert sorted(etags) == sorted(n for n in files if n.endswith(".safetensors"))
    return {**files, INDEX: json.dumps(index, indent=2).encode() + b"\n"}


INDEX = "model.safetensors.index.json"


def uploads_left(uri: str) -> list:
    return objstore.uploads(objstore.Location.parse(uri))


# -- round trips at 2 and 4 ranks, byte-identical to the local save ----------------------------------


def _layouts(rank: int, world: int, uri: str, local: str) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = _full_state()
    cases = {"rows": [Shard(0)], "cols": [Shard(1)]}
    meshes = {name: init_device_mesh("cpu", (world,)) for name in cases}
    if world == 4:
        cases["2d"] = [Shard(0), Shard(1)]
        meshes["2d"] = init_device_mesh("cpu", (2, 2))
    done = []
    for name, place in cases.items():
        mesh = meshes[name]
        sd = {
            k: distribute_tensor(v, mesh, place if v.dim() > 1 else [Replicate()] * mesh.ndim) for k, v in full.items()
        }
        kw = {"max_shard_size": "7MB", "extra_files": {"config.json": "{}"}}
        hf_storage.save(sd, f"{uri}/{name}", **kw)
        hf_storage.save(sd, f"{local}/{name}", **kw)
        done.append(name)
    if world == 2:  # the other front doors, in the same ranks: async_save, then the DCP writer
        _async(rank, world, f"{uri}/async", f"{local}/async")
        _dcp(rank, world, f"{uri}/dcp", f"{local}/dcp")
        done += ["async", "dcp"]
    return done


@pytest.mark.parametrize("world", [2, 4])
def test_round_trip_is_byte_identical_to_the_local_save(s3_bucket, tmp_path, world):
    uri = f"{s3_bucket}/w{world}"
    names = run_ranks(_layouts, world, uri, str(tmp_path))[0]
    assert names == (["rows", "cols", "async", "dcp"] if world == 2 else ["rows", "cols", "2d"])
    if world == 2:
        assert unpinned(objects(f"{uri}/dcp-async")) == local_files(str(tmp_path / "dcp"))
        assert "model.safetensors.index.json" not in objects(f"{uri}/dcp-refused")
        assert uploads_left(f"{uri}/dcp-refused") == []
    for name in names:
        want = local_files(str(tmp_path / name))
        got = unpinned(objects(f"{uri}/{name}"))
        assert sorted(got) == sorted(want)
        assert len([n for n in got if n.endswith(".safetensors")]) == 2, name  # two files, several parts each
        for n in want:
            assert got[n] == want[n], f"{name}/{n} differs"
        assert uploads_left(f"{uri}/{name}") == []
    # and it loads at another world size (1 rank, plain tensors) with the data it was given
    ckpt = hf_storage.open_checkpoint(f"{uri}/cols")
    out = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in ckpt.tensors.items()}
    hf_storage.load(out, f"{uri}/cols")
    torch.testing.assert_close(out, _full_state(), rtol=0, atol=0)


def _full_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(1200, 2100, generator=g).to(torch.bfloat16),
        "b": torch.randn(777, 1234, generator=g),
        "c": torch.randn(3, 500, 700, generator=g).to(torch.bfloat16),
        "d": torch.randn(17, generator=g),
    }


def _async(rank: int, world: int, uri: str, local: str) -> float:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = _full_state()
    sd = {k: distribute_tensor(v, mesh, [Shard(1)] if v.dim() > 1 else [Replicate()]) for k, v in full.items()}
    pending = hf_storage.async_save(sd, uri, max_shard_size="7MB")
    for v in sd.values():  # training goes on: the staged copy, not the live tensors, is what gets saved
        v.to_local().add_(1)
    done = pending.result()
    fresh = _full_state()  # a replicated DTensor shares its input's memory: the +1 reached ``full``
    again = {k: distribute_tensor(v, mesh, [Shard(1)] if v.dim() > 1 else [Replicate()]) for k, v in fresh.items()}
    hf_storage.save(again, local, max_shard_size="7MB")
    return done.stall_seconds


def _dcp(rank: int, world: int, uri: str, local: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    place = {"a": [Shard(0)], "b": [Shard(1)], "c": [Shard(2)], "d": [Replicate()]}
    sd = {k: distribute_tensor(v, mesh, place[k]) for k, v in _full_state().items()}
    dcp.save(sd, storage_writer=hf_storage.HuggingFaceStorageWriter(uri, max_shard_size="7MB"))
    hf_storage.save(sd, local, max_shard_size="7MB")
    back = {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in _full_state().items()}
    dcp.load(back, storage_reader=hf_storage.HuggingFaceStorageReader(uri))
    for k, v in _full_state().items():
        assert torch.equal(back[k].full_tensor(), v), k
    # dcp.async_save in thread mode: the writer's collectives go on the dedicated group it is given ...
    import torch.distributed as dist

    pg = dist.new_group(backend="gloo")
    writer = hf_storage.HuggingFaceStorageWriter(f"{uri}-async", max_shard_size="7MB", process_group=pg)
    dcp.async_save(sd, storage_writer=writer, process_group=pg).result()
    # ... and without one it refuses by name rather than run them on the training's group from a thread
    bare = hf_storage.HuggingFaceStorageWriter(f"{uri}-refused", max_shard_size="7MB")
    try:
        dcp.async_save(sd, storage_writer=bare, process_group=pg).result()
    except BaseException as e:  # DCP wraps every rank's error in a CheckpointException (a BaseException)
        causes = " ".join(str(x) for x in getattr(e, "failures", {}).values()) or str(e)
        assert "process_group=<the dedicated gloo group" in causes, causes
    else:
        raise AssertionError("dcp.async_save without a group should have been refused")


def test_transformers_loads_the_downloaded_checkpoint(s3_bucket, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    uri = f"{s3_bucket}/llama"
    hf_storage.save(model.state_dict(), uri, max_shard_size="5MB", extra_files={"config.json": cfg.to_json_string()})
    down = tmp_path / "down"
    down.mkdir()
    for name, data in objects(uri).items():
        (down / name).write_bytes(data)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(down, dtype=torch.float32)
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k


# -- commit semantics -------------------------------------------------------------------------------


def test_overwrite_replaces_and_drops_stale_files_and_refusal_keeps_the_old(s3_bucket):
    uri = f"{s3_bucket}/over"
    first = _full_state()
    hf_storage.save(first, uri, max_shard_size="4MB")
    assert len([n for n in objects(uri) if n.endswith(".safetensors")]) == 3
    with pytest.raises(CheckpointExistsError, match="already holds a checkpoint"):
        hf_storage.save({"x": torch.zeros(3)}, uri, overwrite=False)
    assert len([n for n in objects(uri) if n.endswith(".safetensors")]) == 3  # untouched
    second = {k: v + 1 for k, v in first.items()}
    hf_storage.save(second, uri)  # one file now: the three old ones must go
    got = objects(uri)
    assert sorted(got) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    out = {k: torch.empty_like(v) for k, v in second.items()}
    hf_storage.load(out, uri)
    torch.testing.assert_close(out, second, rtol=0, atol=0)


def test_the_index_pins_the_objects_it_was_written_with(s3_bucket):
    uri = f"{s3_bucket}/pinned"
    hf_storage.save({"x": torch.arange(8.0)}, uri)
    loc = objstore.Location.parse(uri)
    name = "model-00001-of-00001.safetensors"
    c = s3_client()
    data = c.get_object(Bucket=loc.bucket, Key=loc.key(name))["Body"].read()
    c.put_object(Bucket=loc.bucket, Key=loc.key(name), Body=data[:-4] + b"\0\0\0\0")  # another save's file
    with pytest.raises(objstore.ObjectChangedError, match="not the object its index was written with"):
        hf_storage.open_checkpoint(uri)


def test_a_live_lock_is_named_and_a_stale_one_is_taken_over(s3_bucket, monkeypatch):
    uri = f"{s3_bucket}/locked/ck"
    loc = objstore.Location.parse(uri)
    lock_key = loc.sibling(".ck.lock")
    holder = {"host": "node-7", "pid": 4242, "start": time.time()}
    s3_client().put_object(Bucket=loc.bucket, Key=lock_key, Body=json.dumps(holder).encode())
    with pytest.raises(CheckpointLockedError, match=r"node-7, pid 4242.*lock_wait"):
        hf_storage.save({"x": torch.ones(4)}, uri)
    assert objects(uri) == {}
    monkeypatch.setenv("HF_STORAGE_S3_LEASE", "1")
    time.sleep(2.1)  # the holder stopped renewing it: by the store's clock, the lease ran out
    hf_storage.save({"x": torch.ones(4)}, uri)
    assert "model.safetensors.index.json" in objects(uri)
    assert objstore.head(objstore.Location(loc.bucket, ""), lock_key) is None  # released after the save


# -- faults: a killed rank, a failing rank, a 503 storm, throttling, a wrong endpoint -----------------


def _torchrun_worker(tmp_path: Path, uri: str, *args: str, check: bool = True, **env: str):
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    cmd = torchrun_cmd("tests.s3_worker", 2, "--uri", uri, "--out", str(out), *args)
    cmd.insert(1, "--max-restarts=0")
    res = run(cmd, ROOT, timeout=180, check=check, HF_STORAGE_PART_SIZE=PART, **env)
    reports = {p.name: json.loads(p.read_text()) for p in out.glob("rank*.json")}
    return res, reports


def test_a_killed_rank_leaves_nothing_visible_and_the_next_save_cleans_up(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/killed/ck"
    res, _ = _torchrun_worker(tmp_path, uri, "--fault", "kill", "--fault-rank", "1", check=False)
    assert res.returncode != 0
    assert "model.safetensors.index.json" not in objects(uri)  # nothing looks complete
    assert objects(uri) == {}  # no object at all: parts are invisible until completed
    assert uploads_left(uri), "the killed save's uploads should still be pending (to be cleaned up next)"
    # the next save waits out the dead save's lease, aborts its uploads and publishes
    res, reports = _torchrun_worker(tmp_path, uri, "--lock-wait", "30", HF_STORAGE_S3_LEASE="2")
    assert [r["outcome"] for r in reports.values()] == ["ok", "ok"]
    assert uploads_left(uri) == []
    full = worker_state()
    out = {k: torch.empty_like(v) for k, v in full.items()}
    hf_storage.load(out, uri)
    torch.testing.assert_close(out, full, rtol=0, atol=0)


def test_a_failing_rank_fails_every_rank_and_aborts_every_upload(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/failed/ck"
    res, reports = _torchrun_worker(tmp_path, uri, "--fault", "error", "--fault-rank", "1")
    assert sorted(r["type"] for r in reports.values()) == ["SaveError", "SaveError"]
    assert all("rank 1" in r["message"] and "injected failure" in r["message"] for r in reports.values())
    assert objects(uri) == {}
    assert uploads_left(uri) == []
    lock = objstore.Location.parse(uri)
    assert objstore.head(objstore.Location(lock.bucket, ""), lock.sibling(".ck.lock")) is None


def test_a_503_storm_is_survived(s3_bucket, fault_proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    uri = f"{s3_bucket}/storm"
    full = _full_state()
    fault_proxy.storm_every(3)  # every third request: 503 SlowDown
    hf_storage.save(full, uri, max_shard_size="7MB")
    assert fault_proxy.injected >= 3
    fault_proxy.clear()
    out = {k: torch.empty_like(v) for k, v in full.items()}
    hf_storage.load(out, uri)
    torch.testing.assert_close(out, full, rtol=0, atol=0)


def test_throttling_and_a_wrong_endpoint_give_named_errors(s3_bucket, fault_proxy, monkeypatch):
    monkeypatch.setenv("HF_STORAGE_S3_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    fault_proxy.throttle_forever()
    with pytest.raises(objstore.ObjectStoreThrottledError, match="kept throttling.*HF_STORAGE_S3_ATTEMPTS"):
        hf_storage.save({"x": torch.ones(4)}, f"{s3_bucket}/throttled")
    from tests.dist_utils import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(objstore.ObjectStoreUnreachableError, match="cannot reach the object store.*AWS_ENDPOINT_URL"):
        hf_storage.save({"x": torch.ones(4)}, f"{s3_bucket}/nowhere")


def test_the_checkpoint_manager_refuses_an_object_store_by_name():
    with pytest.raises(hf_storage.HFStorageError, match="object store: call hf_storage.save"):
        hf_storage.CheckpointManager("s3://bkt/run", every=10)


def test_bad_uris_are_refused_before_any_request():
    for bad in ("s3://", "s3:///x", "s3://b/../x"):
        with pytest.raises(hf_storage.HFStorageError, match="not a valid object-store URI"):
            hf_storage.save({"x": torch.ones(2)}, bad)


# -- the part arithmetic, without a server ------------------------------------------------------------


def test_part_sizes_respect_the_store_limits(monkeypatch):
    monkeypatch.setenv("HF_STORAGE_PART_SIZE", str(16 * 2**20))
    assert objstore.part_size(10**6) == 16 * 2**20
    big = 400 * 2**30  # 400 GiB: 16 MiB parts would need 25,600 of them
    p = objstore.part_size(big)
    assert p % 2**20 == 0 and -(-big // p) <= objstore.MAX_PARTS
    monkeypatch.setenv("HF_STORAGE_PART_SIZE", str(2**20))
    with pytest.raises(ValueError, match="5 MiB minimum"):
        objstore.part_size(10)


def test_part_assembly_matches_the_file_bytes_for_every_layout():
    """Parts planned for 3 ranks' pieces of row-, column- and 3-D-sharded tensors, assembled from each
    rank's data, equal the bytes a single writer lays out."""
    from hf_storage import remote
    from hf_storage.box import Box
    from hf_storage.layout import TensorSpec, plan

    g = torch.Generator().manual_seed(1)
    tensors = {
        "r": torch.randint(0, 255, (300, 70), generator=g, dtype=torch.uint8),
        "c": torch.randint(0, 255, (90, 301), generator=g, dtype=torch.uint8),
        "k": torch.randint(0, 255, (4, 30, 50), generator=g, dtype=torch.uint8),
    }
    layout = plan([TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    f = layout.files[0]
    whole = bytearray(f.size)
    whole[: len(f.header)] = f.header
    for n, t in tensors.items():
        p = layout.tensors[n]
        whole[p.offset : p.offset + t.numel()] = t.numpy().tobytes()
    boxes = {
        "r": [Box((0, 0), (101, 70)), Box((101, 0), (99, 70)), Box((200, 0), (100, 70))],
        "c": [Box((0, 0), (90, 100)), Box((0, 100), (90, 101)), Box((0, 201), (90, 100))],
        "k": [Box((0, 0, 0), (4, 30, 17)), Box((0, 0, 17), (4, 30, 16)), Box((0, 0, 33), (4, 30, 17))],
    }
    pieces, data = [[], [], []], [[], [], []]
    for n, bs in boxes.items():
        p = layout.tensors[n]
        for r, b in enumerate(bs):
            sl = tuple(slice(o, o + s) for o, s in zip(b.offsets, b.sizes))
            pieces[r].append(remote.Piece(n, p.file, p.offset, tuple(tensors[n].shape), 1, b))
            data[r].append(tensors[n][sl].contiguous().reshape(-1))
    parts = remote.Parts.plan(layout, pieces, part_size=lambda size: 1000)  # tiny parts: many boundaries
    assert parts.files[0].count > 20 and parts.shared()
    for k in range(parts.files[0].count):
        key = (0, k)
        owner = parts.owner[key]
        received = {}
        for r in parts.holders[key]:
            if r != owner:
                received[(r, 0, k)] = torch.cat([data[r][i][c.d0 : c.d1] for i, c in parts.clips(r, key)])
        buf = remote._assemble(parts, key, data[owner], received)
        a, b = parts.files[0].bounds(k)
        assert bytes(buf.numpy()) == bytes(whole[a:b]), f"part {k}"


def test_uri_locations():
    loc = objstore.Location.parse("s3://bkt/ckpt/step-1000/")
    assert (loc.bucket, loc.prefix, loc.name) == ("bkt", "ckpt/step-1000", "step-1000")
    assert loc.key("a.json") == "ckpt/step-1000/a.json"
    assert loc.sibling(".step-1000.lock") == "ckpt/.step-1000.lock"
    assert objstore.is_uri("s3://b/x") and not objstore.is_uri("/tmp/x") and not objstore.is_uri(Path("/x"))
