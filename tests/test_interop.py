"""Interoperability with transformers and with torch's own HF storage classes."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader as TorchHFReader
from torch.distributed.checkpoint import HuggingFaceStorageWriter as TorchHFWriter

import hf_storage
from tests.dist_utils import run_ranks

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _save_sharded_llama(rank: int, world_size: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from tests import matrix
    from tests.matrix import shard  # noqa: F401  (placement helper reused below)

    model = tiny_llama()
    mesh = init_device_mesh("cpu", (world_size,))
    sd = {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        pname = "cols" if i % 2 and t.dim() == 2 else "rows"
        sd[name] = matrix.shard(t.detach(), mesh, pname)
        assert sd[name].placements[0] in (Shard(0), Shard(1))
    hf_storage.save(sd, out, max_shard_size="20KB", extra_files={"config.json": model.config.to_json_string()})


def test_sharded_save_loads_in_transformers_with_identical_weights(tmp_path):
    out = str(tmp_path / "llama")
    run_ranks(_save_sharded_llama, 2, out)
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = tiny_llama().state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_llama()(ids).logits)


def test_torch_reader_loads_our_output(tmp_path):
    ref = tiny_llama().state_dict()
    hf_storage.save(ref, tmp_path / "ours", max_shard_size="20KB")
    target = {k: torch.empty_like(v) for k, v in ref.items()}
    dcp.load(target, storage_reader=TorchHFReader(str(tmp_path / "ours")))
    assert [k for k in ref if not torch.equal(ref[k], target[k])] == []


def test_we_read_transformers_sharded_save_pretrained(tmp_path):
    model = tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ref = model.state_dict()
    ckpt = hf_storage.open_checkpoint(tmp_path / "hf")
    target = {k: torch.empty_like(v) for k, v in ref.items() if k in ckpt.tensors}
    hf_storage.load(target, tmp_path / "hf")
    assert target and [k for k in target if not torch.equal(ref[k], target[k])] == []
    target2 = {k: torch.empty_like(v) for k, v in target.items()}
    dcp.load(target2, storage_reader=hf_storage.HuggingFaceStorageReader(str(tmp_path / "hf")))
    assert [k for k in target if not torch.equal(ref[k], target2[k])] == []


def test_we_read_torch_writer_single_process_output(tmp_path):
    ref = {k: v for k, v in tiny_llama(seed=4).state_dict().items()}
    dcp.save(ref, storage_writer=TorchHFWriter(str(tmp_path / "t")))
    target = {k: torch.zeros_like(v) for k, v in ref.items()}
    hf_storage.load(target, tmp_path / "t")
    assert [k for k in ref if not torch.equal(ref[k], target[k])] == []


def _torch_distributed_save(rank: int, world_size: int, out: str, consolidate: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from tests import matrix

    mesh = init_device_mesh("cpu", (world_size,))
    sd = {k: matrix.shard(v.detach(), mesh, "rows") for k, v in tiny_llama(seed=5).state_dict().items()}
    dcp.save(sd, storage_writer=TorchHFWriter(out, save_distributed=True, enable_consolidation=consolidate))


def _load_rows(rank: int, world_size: int, src: str) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh

    from tests import matrix

    mesh = init_device_mesh("cpu", (world_size,))
    ref = tiny_llama(seed=5).state_dict()
    sd = {k: matrix.shard(torch.zeros_like(v), mesh, "cols" if v.dim() == 2 else "rows") for k, v in ref.items()}
    hf_storage.load(sd, src)
    bad = []
    for k, v in ref.items():
        want = matrix.shard(v, mesh, "cols" if v.dim() == 2 else "rows").to_local()
        if not torch.equal(sd[k].to_local(), want):
            bad.append(k)
    return bad


@pytest.mark.parametrize("consolidate", [False, True])
def test_we_read_torch_distributed_writer_output(tmp_path, consolidate):
    out = str(tmp_path / "t")
    run_ranks(_torch_distributed_save, 2, out, consolidate)
    if not consolidate:
        names = os.listdir(out)
        assert any(n.startswith("shard-") for n in names) and "model.safetensors.index.json" not in names
    assert run_ranks(_load_rows, 2, out) == [[], []]


def test_config_json_is_written_before_publication(tmp_path):
    model = tiny_llama()
    hf_storage.save(model.state_dict(), tmp_path / "c", extra_files={"config.json": model.config.to_json_string()})
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 2
