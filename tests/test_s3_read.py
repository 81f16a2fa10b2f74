"""Reading checkpoints from an object store (``s3://bucket/prefix``) against a local moto server.

Checkpoints are saved locally with ``hf_storage.save`` and uploaded with plain ``put_object``; every load from the
store is compared bit for bit with the same load from the local directory: plain tensors, DTensor row and column
shards on two gloo ranks, casts, non-contiguous targets, DCP. Faults go through ``tests.s3_server.FaultProxy``:
503 storms and dropped connections are survived, endless throttling, an unreachable endpoint, a replaced, truncated
or missing object fail with named errors. ``verify`` and ``inspect`` run on the store too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import hf_storage
from hf_storage import CheckpointFormatError, HuggingFaceStorageReader, engine, objstore, reader, verify
from hf_storage.__main__ import main
from hf_storage.api import _requests
from hf_storage.box import Box
from hf_storage.layout import INDEX_NAME
from tests import matrix
from tests.dist_utils import free_port, run_ranks
from tests.s3_server import s3_client

ROOT = Path(__file__).resolve().parents[1]
# Tensors large enough for every read path: row shards of >= 1 MiB runs (read straight into the target), column
# shards of short runs (spans of whole rows), and a 3-D tensor sharded in its middle dimension.
BIG = {
    "big.rows": (torch.float32, (1024, 512)),
    "big.wide": (torch.bfloat16, (64, 16384)),
    "big.cube": (torch.float32, (8, 64, 1024)),
}


def _state() -> dict[str, torch.Tensor]:
    sd = {name: matrix.reference(name, dt, shape) for name, dt, shape in matrix.case_names()}
    sd.update({name: matrix.reference(name, dt, shape) for name, (dt, shape) in BIG.items()})
    return sd


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A multi-file checkpoint (every dtype and shape of the matrix, and the big tensors) in a local directory."""
    path = tmp_path_factory.mktemp("s3read") / "ckpt"
    hf_storage.save(_state(), path, max_shard_size="2MB")
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path


def upload(endpoint: str, local: Path, uri: str, skip: tuple[str, ...] = (), bodies: dict | None = None) -> str:
    """Put every file of ``local`` under the URI's prefix, but those in ``skip``; ``bodies``: other contents."""
    loc = objstore.Location.parse(uri)
    client = s3_client(endpoint)
    for p in sorted(local.iterdir()):
        if p.name not in skip:
            body = (bodies or {}).get(p.name) or p.read_bytes()
            client.put_object(Bucket=loc.bucket, Key=loc.key(p.name), Body=body)
    return uri


@pytest.fixture
def remote(s3_server, s3_bucket, saved) -> str:
    return upload(s3_server.endpoint, saved, f"{s3_bucket}/run/step-10")


def _zeros(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Targets of the same shapes and dtypes, zero bits (any dtype)."""
    return {
        k: torch.zeros(v.numel() * v.element_size(), dtype=torch.uint8).view(v.dtype).reshape(v.shape)
        for k, v in sd.items()
    }


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not matrix.same_bits(a[k], b[k])]


# -- plain tensors ------------------------------------------------------------------------------------------------


def test_load_equals_the_local_load_bit_for_bit(saved, remote, monkeypatch):
    local, from_s3 = _zeros(_state()), _zeros(_state())
    hf_storage.load(local, saved)
    summary = hf_storage.load(from_s3, remote, thread_count=4)
    assert _differ(local, _state()) == [] and _differ(from_s3, local) == []
    assert summary.path == remote and summary.local_bytes == sum(v.numel() * v.element_size() for v in local.values())
    # small budget and pieces: several span blocks per box, large runs cut into pieces, small tensors merged
    monkeypatch.setattr(engine, "_SPLIT", 128 * 2**10)
    from_s3 = _zeros(_state())
    hf_storage.load(from_s3, remote, thread_count=3, budget=192 * 2**10)
    assert _differ(from_s3, local) == []


def test_column_boxes_read_through_spans_equal_the_local_read(saved, remote):
    """Boxes of many short runs (column shards, a middle-dimension shard) go through span reads; in a small budget,
    into contiguous targets, transposed (non-contiguous) ones and casts."""
    sd = _state()
    ckpt, local_ckpt = hf_storage.open_checkpoint(remote), hf_storage.open_checkpoint(saved)
    boxes = {
        "big.rows": Box((0, 100), (1024, 150)),
        "big.wide": Box((3, 8000), (61, 300)),
        "big.cube": Box((1, 5, 0), (6, 40, 1024)),
    }
    boxes["big.cube.cols"] = Box((0, 0, 1000), (8, 64, 24))
    for kind in ("contiguous", "transposed", "cast"):
        got, want = [], []
        for key, box in boxes.items():
            name = key.removesuffix(".cols")
            for ck, out in ((ckpt, got), (local_ckpt, want)):
                (chunk,) = ck.tensors[name].chunks
                t = _target(box.sizes, sd[name].dtype, kind)
                out.append(t)
                reader.read_requests(ck, [(chunk, t, box)], thread_count=2, budget=256 * 2**10)
            full = sd[name].double() if kind == "cast" else sd[name]
            expect = full[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))]
            assert matrix.same_bits(got[-1].contiguous(), expect), (kind, key)
        assert all(matrix.same_bits(a.contiguous(), b.contiguous()) for a, b in zip(got, want))


def _target(sizes: tuple[int, ...], dtype: torch.dtype, kind: str) -> torch.Tensor:
    if kind == "cast":
        return torch.zeros(sizes, dtype=torch.float64)
    if kind == "transposed":
        return torch.zeros(sizes[::-1], dtype=dtype).permute(*reversed(range(len(sizes))))
    return torch.zeros(sizes, dtype=dtype)


def test_cast_load(saved, remote):
    floats = {k: v for k, v in _state().items() if v.dtype in (torch.float32, torch.bfloat16, torch.float16)}
    local = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in floats.items()}
    from_s3 = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in floats.items()}
    hf_storage.load(local, saved, allow_cast=True)
    hf_storage.load(from_s3, remote, allow_cast=True, budget=2**20)
    assert _differ(from_s3, local) == []
    assert all(torch.equal(local[k].nan_to_num(0.5), v.double().nan_to_num(0.5)) for k, v in floats.items())
    with pytest.raises(hf_storage.StateDictMismatchError, match=f"checkpoint at {remote}: .*allow_cast"):
        hf_storage.load(from_s3, remote)


def test_dcp_load_through_the_storage_reader(saved, remote):
    from torch.distributed.checkpoint import load as dcp_load

    assert HuggingFaceStorageReader.validate_checkpoint_id(remote)
    assert not HuggingFaceStorageReader.validate_checkpoint_id("s3://bucket/a/../b")
    local, from_s3 = _zeros(_state()), _zeros(_state())
    dcp_load(local, storage_reader=HuggingFaceStorageReader(saved))
    dcp_load(from_s3, storage_reader=HuggingFaceStorageReader(remote, thread_count=4))
    assert _differ(from_s3, local) == [] and _differ(local, _state()) == []
    again = HuggingFaceStorageReader("/nowhere")
    again.reset(remote)
    from_s3 = _zeros(_state())
    dcp_load(from_s3, storage_reader=again, checkpoint_id=remote)
    assert _differ(from_s3, local) == []


def test_without_an_index_the_files_are_listed(s3_server, s3_bucket, saved):
    uri = upload(s3_server.endpoint, saved, f"{s3_bucket}/noindex", skip=(INDEX_NAME,))
    ckpt = hf_storage.open_checkpoint(uri)
    assert ckpt.index is None and sorted(ckpt.files) == sorted(p.name for p in saved.glob("*.safetensors"))
    got = _zeros(_state())
    hf_storage.load(got, uri)
    assert _differ(got, _state()) == []


# -- DTensors on two ranks ----------------------------------------------------------------------------------------


def _dtensor_worker(rank: int, world_size: int, remote: str, local: str) -> dict[str, list[str]]:
    """Load into row- and column-sharded DTensors (matrix placements "rows" and "last"), from the store and from the
    local copy; the names whose local shards differ from each other or from the saved data."""
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for pname in ("rows", "last"):
        loaded = {}
        for src in (remote, local):
            loaded[src] = {k: matrix.shard(v, mesh, pname) for k, v in _zeros(_state()).items()}
            hf_storage.load(loaded[src], src, thread_count=2)
        want = {k: matrix.shard(v, mesh, pname).to_local() for k, v in _state().items()}
        s3, disk = loaded[remote], loaded[local]
        out[pname] = [k for k in want if not matrix.same_bits(s3[k].to_local(), disk[k].to_local())]
        out[pname] += [k for k in want if not matrix.same_bits(disk[k].to_local(), want[k])]
    return out


def test_row_and_column_sharded_dtensors_on_two_ranks(saved, remote):
    results = run_ranks(_dtensor_worker, 2, remote, str(saved), timeout=120)
    assert results == [{"rows": [], "last": []}] * 2


# -- failures -----------------------------------------------------------------------------------------------------


def test_an_object_replaced_after_open_raises_object_changed(s3_server, remote, saved):
    ckpt = hf_storage.open_checkpoint(remote)
    name = ckpt.tensors["big.rows"].chunks[0].file
    body = bytearray((saved / name).read_bytes())
    body[-1] ^= 0xFF  # same size, same header: only the ETag tells
    loc = objstore.Location.parse(remote)
    s3_client(s3_server.endpoint).put_object(Bucket=loc.bucket, Key=loc.key(name), Body=bytes(body))
    targets = {"big.rows": torch.zeros(1024, 512)}
    with pytest.raises(objstore.ObjectChangedError, match=name):
        reader.read_requests(ckpt, _requests(ckpt, targets), thread_count=2)
    hf_storage.load(targets, remote)  # a fresh open reads the new object
    assert not torch.equal(targets["big.rows"], _state()["big.rows"])


def test_a_truncated_object_is_a_format_error_naming_it(s3_server, s3_bucket, saved):
    name = sorted(p.name for p in saved.glob("*.safetensors"))[1]
    short = (saved / name).read_bytes()[:-100]
    uri = upload(s3_server.endpoint, saved, f"{s3_bucket}/short", bodies={name: short})
    with pytest.raises(CheckpointFormatError, match=f"{uri}/{name}.*truncated"):
        hf_storage.load(_zeros(_state()), uri)


def test_a_missing_file_is_named(s3_server, s3_bucket, saved):
    name = sorted(p.name for p in saved.glob("*.safetensors"))[0]
    uri = upload(s3_server.endpoint, saved, f"{s3_bucket}/missing", skip=(name,))
    with pytest.raises(CheckpointFormatError, match=f"checkpoint file '{name}' is missing from {uri}"):
        hf_storage.open_checkpoint(uri)


@pytest.mark.parametrize("bad", ["../other/model.safetensors", "/abs.safetensors", "a\\b.safetensors", "x\0y"])
def test_index_names_outside_the_prefix_are_refused(s3_server, s3_bucket, bad):
    loc = objstore.Location.parse(f"{s3_bucket}/p")
    index = json.dumps({"metadata": {}, "weight_map": {"w": bad}}).encode()
    s3_client(s3_server.endpoint).put_object(Bucket=loc.bucket, Key=loc.key(INDEX_NAME), Body=index)
    with pytest.raises(CheckpointFormatError, match="outside the checkpoint directory|invalid file"):
        hf_storage.open_checkpoint(loc.uri)


def test_a_503_storm_is_survived_with_identical_data(remote, fault_proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    fault_proxy.storm(3)
    got = _zeros(_state())
    hf_storage.load(got, remote, thread_count=4)
    assert fault_proxy.injected == 3 and _differ(got, _state()) == []
    fault_proxy.storm_every(7)
    got = _zeros(_state())
    hf_storage.load(got, remote, thread_count=4)
    assert fault_proxy.injected > 3 and _differ(got, _state()) == []


def test_dropped_connections_are_survived(remote, fault_proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    fault_proxy.drop(4)
    got = _zeros(_state())
    hf_storage.load(got, remote, thread_count=4)
    assert fault_proxy.injected == 4 and _differ(got, _state()) == []


def test_endless_throttling_is_named(remote, fault_proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    monkeypatch.setenv("HF_STORAGE_S3_ATTEMPTS", "2")
    ckpt = hf_storage.open_checkpoint(remote)
    (chunk,) = ckpt.tensors["big.rows"].chunks
    fault_proxy.throttle_forever()
    with pytest.raises(objstore.ObjectStoreThrottledError, match="kept throttling.*2 attempts"):
        box = Box((0, 7), (1024, 100))  # a column shard: 128 span requests of 8 rows in this budget
        reader.read_requests(ckpt, [(chunk, torch.zeros(1024, 100), box)], thread_count=4, budget=64 * 2**10)
    assert 2 <= fault_proxy.injected < 20  # once one request failed, the queued ones were skipped
    with pytest.raises(objstore.ObjectStoreThrottledError):
        hf_storage.load(_zeros(_state()), remote)


def test_an_unreachable_endpoint_is_named(remote, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_STORAGE_S3_ATTEMPTS", "2")
    with pytest.raises(objstore.ObjectStoreUnreachableError, match="cannot reach the object store"):
        hf_storage.load(_zeros(_state()), remote)


# -- verify and inspect -------------------------------------------------------------------------------------------


def test_verify_clean_and_a_flipped_byte(s3_server, s3_bucket, saved, remote, capsys):
    rep = verify.verify(remote, block_bytes=64 * 2**10)
    assert rep.clean, rep.format()
    assert rep.checksummed == rep.tensors == len(_state()) and rep.path == remote
    assert main(["verify", "--strict", remote]) == 0

    ckpt = hf_storage.open_checkpoint(saved)
    (chunk,) = ckpt.tensors["big.wide"].chunks
    body = bytearray((saved / chunk.file).read_bytes())
    body[chunk.begin + 12345] ^= 0x10
    bad = upload(s3_server.endpoint, saved, f"{s3_bucket}/flipped", bodies={chunk.file: bytes(body)})
    s3_client(s3_server.endpoint).put_object(
        Bucket=s3_bucket.removeprefix("s3://"), Key="flipped/stray.safetensors", Body=b"x"
    )
    rep = verify.verify(bad, block_bytes=64 * 2**10)
    assert [(f.file, f.tensor) for f in rep.problems] == [(chunk.file, "big.wide")]
    assert "data is corrupted" in rep.problems[0].cause
    assert any("stray.safetensors" in str(w) for w in rep.warnings)
    capsys.readouterr()
    assert main(["verify", bad]) == 1
    assert "tensor 'big.wide'" in capsys.readouterr().out


def test_inspect_cli_on_s3(saved, remote):
    proc = subprocess.run(
        [sys.executable, "-m", "hf_storage", "inspect", "--json", remote], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [r._asdict() | {"shape": list(r.shape)} for r in verify.inspect(saved)] == doc["tensors"]
    assert doc["total_bytes"] == hf_storage.open_checkpoint(saved).nbytes()


def test_cli_store_errors_exit_2(remote, monkeypatch, capsys):
    assert main(["inspect", "s3://bucket/a/../b"]) == 2
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_STORAGE_S3_ATTEMPTS", "1")
    capsys.readouterr()
    assert main(["verify", remote]) == 2
    assert "cannot reach the object store" in capsys.readouterr().err
