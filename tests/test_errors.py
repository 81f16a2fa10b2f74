"""Bad input gets one clear error naming every offending key, and nothing is written or published."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import hf_storage
from hf_storage import (
    CheckpointExistsError,
    HuggingFaceStorageReader,
    HuggingFaceStorageWriter,
    LayoutError,
    StateDictMismatchError,
    UnsupportedEntryError,
)
from hf_storage.publish import staging_dirs


def small():
    return {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}


def test_non_tensor_entries_are_refused_before_any_byte_is_written(tmp_path):
    sd = {**small(), "step": 7, "opt": {"lr": 0.1, "w": torch.ones(2)}}
    out = tmp_path / "x"
    with pytest.raises(UnsupportedEntryError) as e:
        hf_storage.save(sd, out)
    assert "'opt.lr'" in str(e.value) and "'step'" in str(e.value)
    assert not out.exists() and not staging_dirs(out)


def test_dcp_writer_names_every_non_tensor_key_and_writes_nothing(tmp_path):
    sd = {**small(), "step": 7, "note": "text"}
    out = tmp_path / "x"
    with pytest.raises(CheckpointException) as e:  # DCP wraps each rank's error
        dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(out)))
    assert "'note'" in str(e.value) and "'step'" in str(e.value)
    assert not out.exists() and not staging_dirs(out)


def test_unsupported_dtype_is_named(tmp_path):
    with pytest.raises(UnsupportedEntryError, match="complex128.*'z'"):
        hf_storage.save({"z": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "x")


def test_mapping_missing_keys_listed(tmp_path):
    with pytest.raises(LayoutError, match="'b'"):
        hf_storage.save(small(), tmp_path / "x", fqn_to_index_mapping={"a": 1})
    assert not (tmp_path / "x").exists()


def test_overwrite_false_keeps_the_existing_checkpoint(tmp_path):
    out = tmp_path / "x"
    hf_storage.save(small(), out)
    with pytest.raises(CheckpointExistsError, match="overwrite"):
        hf_storage.save({"c": torch.zeros(3)}, out, overwrite=False)
    target = {k: torch.empty_like(v) for k, v in small().items()}
    hf_storage.load(target, out)
    assert torch.equal(target["a"], small()["a"])


def test_replace_is_atomic_and_keeps_foreign_files(tmp_path):
    out = tmp_path / "x"
    hf_storage.save(small(), out, max_shard_size=16)
    (out / "tokenizer.json").write_text("{}")
    (out / "extra").mkdir()
    (out / "extra" / "notes.txt").write_text("keep me")
    hf_storage.save({"c": torch.full((3,), 2.0)}, out)
    names = sorted(os.listdir(out))
    assert names == ["extra", "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    assert (out / "extra" / "notes.txt").read_text() == "keep me"
    t = {"c": torch.empty(3)}
    hf_storage.load(t, out)
    assert torch.equal(t["c"], torch.full((3,), 2.0))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_leftover_staging_from_an_interrupted_save_is_cleaned(tmp_path):
    out = tmp_path / "x"
    st = out.parent / f".{out.name}.staging-0123456789ab"  # as a killed save leaves it
    st.mkdir()
    (st / "model-00001-of-00002.safetensors").write_bytes(b"junk")
    hf_storage.save(small(), out)
    assert not st.exists() and (out / "model.safetensors.index.json").exists()


def test_output_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(hf_storage.HFStorageError, match="not a directory"):
        hf_storage.save(small(), f)
    assert f.read_text() == "x"


def test_load_names_every_missing_key_and_mismatch_at_once(tmp_path):
    hf_storage.save(small(), tmp_path / "x")
    target = {"a": torch.empty(3, 2), "b": torch.empty(4, dtype=torch.int32), "c": torch.empty(1), "d": torch.empty(1)}
    with pytest.raises(StateDictMismatchError) as e:
        hf_storage.load(target, tmp_path / "x")
    msg = str(e.value)
    for frag in ("a: shape [3, 2]", "b: dtype torch.int32", "c: missing", "d: missing"):
        assert frag in msg
    assert msg.startswith("4 target tensors")


def test_strict_false_and_allow_cast(tmp_path):
    hf_storage.save(small(), tmp_path / "x")
    target = {"a": torch.empty(2, 3, dtype=torch.bfloat16), "zzz": torch.full((1,), 5.0)}
    s = hf_storage.load(target, tmp_path / "x", strict=False, allow_cast=True)
    assert s.tensors == 1 and torch.equal(target["a"], small()["a"].bfloat16()) and target["zzz"].item() == 5.0


def test_dcp_reader_names_every_dtype_mismatch(tmp_path):
    hf_storage.save(small(), tmp_path / "x")
    target = {"a": torch.empty(2, 3, dtype=torch.float16), "b": torch.empty(4, dtype=torch.float32)}
    with pytest.raises(CheckpointException) as e:
        dcp.load(target, storage_reader=HuggingFaceStorageReader(str(tmp_path / "x")))
    assert "'a (target torch.float16" in str(e.value) and "'b (target torch.float32" in str(e.value)
    dcp.load(target, storage_reader=HuggingFaceStorageReader(str(tmp_path / "x"), allow_cast=True))
    assert torch.equal(target["b"], small()["b"].float())


def test_reading_a_directory_without_checkpoint_is_explained(tmp_path):
    with pytest.raises(hf_storage.CheckpointFormatError, match="no model.safetensors.index.json"):
        hf_storage.load({"a": torch.empty(1)}, tmp_path)


def test_bad_thread_count(tmp_path):
    with pytest.raises(ValueError, match="thread_count"):
        HuggingFaceStorageWriter(str(tmp_path), thread_count=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_tensors_are_staged_in_bounded_blocks(tmp_path):
    sd = {"w": torch.randn(1000, 300, device="cuda"), "b": torch.randn(7, device="cuda").to(torch.bfloat16)}
    hf_storage.save(sd, tmp_path / "g", budget=64 * 1024)
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    hf_storage.load(target, tmp_path / "g", budget=64 * 1024)
    assert all(torch.equal(sd[k], target[k]) for k in sd)
