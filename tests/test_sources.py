"""Sources: the counter-based random init, the torchtitan <-> HF key adapter, and dcp / hf sources end to end.

The dcp test saves a torchtitan-named DCP checkpoint, converts it with ``launcher.save source=dcp`` on two
gloo ranks whose shards cut through attention heads, and checks that transformers' Llama computes the same
logits as a reference forward written here in torchtitan's convention (interleaved-pair rotary).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from launcher import sources, titan
from launcher.models import ParamSpec, param_specs
from tests.dist_utils import run_ranks

# ------------------------------------------------------------------------------------------------ random

M64 = (1 << 64) - 1


def splitmix_reference(i: int, key: int) -> int:
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_splitmix64_matches_a_plain_python_reference():
    key = sources.stream_key(7, "model.layers.0.mlp.up_proj.weight")
    idx = [0, 1, 2, 3, 1000, 2**31 - 1, 2**31, 2**40 + 123, 2**62 + 5]
    got = sources.splitmix64(torch.tensor(idx, dtype=torch.int64), key).tolist()
    assert got == [sources._signed(splitmix_reference(i, key & M64)) for i in idx]


@pytest.mark.parametrize(
    "shape,offsets,sizes",
    [
        ((37, 11), (0, 0), (37, 11)),
        ((37, 11), (5, 3), (9, 7)),
        ((37, 11), (36, 10), (1, 1)),
        ((259,), (65,), (65,)),
        ((6, 5, 4), (1, 2, 1), (4, 3, 2)),
        ((10, 3), (4, 0), (0, 3)),
    ],
)
def test_random_box_is_the_slice_of_the_whole(shape, offsets, sizes, monkeypatch):
    monkeypatch.setattr(sources, "SLAB_ELEMENTS", 8)  # many slabs even for small boxes
    whole = sources.random_box(sources.Noise(3, std=0.5), "w", shape, (0,) * len(shape), shape)
    box = sources.random_box(sources.Noise(3, std=0.5), "w", shape, offsets, sizes, workers=3)
    want = whole[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))]
    assert torch.equal(box, want)


def test_random_values_depend_on_seed_name_and_dtype_only_through_one_cast():
    a = sources.random_box(sources.Noise(0), "a", (64, 64), (0, 0), (64, 64), dtype=torch.float32)
    assert not torch.equal(a, sources.random_box(sources.Noise(1), "a", (64, 64), (0, 0), (64, 64)))
    assert not torch.equal(a, sources.random_box(sources.Noise(0), "b", (64, 64), (0, 0), (64, 64)))
    bf = sources.random_box(sources.Noise(0), "a", (64, 64), (0, 0), (64, 64), dtype=torch.bfloat16)
    assert torch.equal(bf, a.to(torch.bfloat16))


def test_random_init_statistics():
    x = sources.random_box(sources.Noise(0, std=0.02), "w", (512, 512), (0, 0), (512, 512), dtype=torch.float64)
    assert abs(x.mean().item()) < 2e-4 and math.isclose(x.std().item(), 0.02, rel_tol=0.01)
    norm = sources.random_local(0, ParamSpec("n", (512,), None, "norm"), (0,), (512,), 0.02, torch.float32, "cpu")
    assert abs(norm.mean().item() - 1.0) < 0.01


# ----------------------------------------------------------------------------------------------- adapter

N_HEADS, N_KV, HEAD_DIM = 4, 1, 16
TINY = ["+model=tiny", f"model.num_key_value_heads={N_KV}"]
NAME_SETS = pytest.mark.parametrize("names", [titan.CURRENT, titan.LEGACY], ids=["current", "legacy"])


def tiny_model(**changes):
    from omegaconf import OmegaConf

    base = dict(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        head_dim=None,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    )
    return OmegaConf.create(base | changes)


def titan_state(seed: int = 0, names: titan.TitanNames = titan.CURRENT) -> dict[str, torch.Tensor]:
    """A torchtitan Llama state dict under ``names``; the same values under either set for one seed."""
    g = torch.Generator().manual_seed(seed)
    specs = param_specs(tiny_model())
    return {
        titan.titan_name(s.name, names): torch.randn(s.shape, generator=g) * (0.2 if s.init == "normal" else 0.05)
        + (1.0 if s.init == "norm" else 0.0)
        for s in specs
    }


@NAME_SETS
def test_names_map_both_ways_for_every_parameter(names):
    for s in param_specs(tiny_model()):
        assert titan.hf_name(titan.titan_name(s.name, names)) == s.name
    assert titan.hf_name("layers.0.feed_forward.w2.weight") == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(titan.UnknownKeyError, match="layers.0.attention.wx.weight"):
        titan.hf_name("layers.0.attention.wx.weight")


def test_the_two_torchtitan_name_sets():
    """torchtitan main (Llama3StateDictAdapter since pytorch/torchtitan#2878, #2937) and v0.2.2 and before."""
    q, k, head = "model.layers.3.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "lm_head.weight"
    assert titan.titan_name(q) == "layers.3.attention.qkv_linear.wq.weight"  # CURRENT is the default
    assert titan.titan_name(k, titan.CURRENT) == "layers.0.attention.qkv_linear.wk.weight"
    assert titan.titan_name(head, titan.CURRENT) == "lm_head.weight"
    assert titan.titan_name(q, titan.LEGACY) == "layers.3.attention.wq.weight"
    assert titan.titan_name(head, titan.LEGACY) == "output.weight"
    for name in ("layers.3.attention.qkv_linear.wq.weight", "layers.3.attention.wq.weight"):
        assert titan.hf_name(name) == q
    assert titan.hf_name("output.weight") == titan.hf_name("lm_head.weight") == head
    assert titan.titan_name("model.layers.1.self_attn.o_proj.weight", titan.CURRENT) == "layers.1.attention.wo.weight"


@NAME_SETS
def test_detect_reads_the_set_from_the_keys(names):
    keys = list(titan_state(names=names)) + ["lr_scheduler.last_epoch", "optimizer.state.layers.0.attention.wq.weight"]
    assert titan.detect(keys) == names
    assert titan.detect([f"model.{k}" for k in keys] + ["output.weight"], prefix="model.") == names
    assert names.qkv in names.describe() and names.head in names.describe()


def test_detect_reads_qkv_and_head_apart_and_refuses_what_it_cannot_map():
    mixed = ["layers.0.attention.qkv_linear.wq.weight", "output.weight"]  # torchtitan main, 2026-04-16..27
    assert titan.detect(mixed) == titan.TitanNames("attention.qkv_linear.", "output.weight")
    assert titan.detect(["layers.0.attention.wk.weight"]) == titan.LEGACY  # tied or head-less: follow q/k/v
    assert titan.detect(["tok_embeddings.weight"]) == titan.CURRENT
    with pytest.raises(titan.UnknownKeyError, match="fused q/k/v.*#3656"):
        titan.detect(["layers.0.attention.qkv_linear.wqkv.weight", "lm_head.weight"])
    with pytest.raises(titan.UnknownKeyError, match="mixes torchtitan's two sets"):
        titan.detect(["layers.0.attention.wq.weight", "layers.1.attention.qkv_linear.wq.weight"])
    with pytest.raises(titan.UnknownKeyError, match="mixes"):
        titan.to_hf(titan_state() | {"output.weight": torch.zeros(1)}, N_HEADS, N_KV)


def test_rotary_permutation_moves_pairs_to_halves():
    d = 8
    w = torch.arange(2 * d, dtype=torch.float32).reshape(2 * d, 1)  # two heads
    got = titan.interleaved_to_halves(w, 2).flatten().tolist()
    assert got == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(titan.halves_to_interleaved(titan.interleaved_to_halves(w, 2), 2), w)


@NAME_SETS
def test_to_hf_and_from_hf_are_inverse(names):
    sd = titan_state(names=names)
    hf = titan.to_hf(sd, N_HEADS, N_KV)
    assert set(hf) == {s.name for s in param_specs(tiny_model())}
    assert not torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], sd[f"layers.0.{names.qkv}wq.weight"])
    assert torch.equal(hf["model.layers.0.self_attn.v_proj.weight"], sd[f"layers.0.{names.qkv}wv.weight"])
    assert torch.equal(hf["lm_head.weight"], sd[names.head])
    back = titan.from_hf(hf, N_HEADS, N_KV, names)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())


def test_the_rotary_permutation_is_the_same_under_both_sets():
    current, legacy = titan_state(3, titan.CURRENT), titan_state(3, titan.LEGACY)
    a, b = titan.to_hf(current, N_HEADS, N_KV), titan.to_hf(legacy, N_HEADS, N_KV)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    renamed = titan.from_hf(a, N_HEADS, N_KV, titan.LEGACY)
    assert renamed.keys() == legacy.keys() and all(torch.equal(renamed[k], legacy[k]) for k in legacy)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    ],
)
def test_a_shard_needs_only_the_heads_it_overlaps(name):
    sd = titan_state()
    full_hf = titan.to_hf(sd, N_HEADS, N_KV)[name]
    source = sd[titan.titan_name(name)]
    for lo, n, c0, c1 in [(0, 5, 0, 64), (3, 17, 10, 20), (15, 2, 0, 1), (16, 16, 0, 64), (7, 0, 0, 64)]:
        if lo + n > source.shape[0]:
            continue
        offsets, sizes = (lo, c0), (n, c1 - c0)
        (so, sr), (ss, sc) = titan.source_box(name, offsets, sizes, HEAD_DIM)
        assert n == 0 or so % HEAD_DIM == 0 or titan.rotary(name) is None
        assert ss <= n + 2 * HEAD_DIM
        box = source[so : so + ss, sr : sr + sc]
        got = titan.hf_rows_from_source(name, box, (so, sr), offsets, sizes, HEAD_DIM)
        assert torch.equal(got, full_hf[lo : lo + n, c0:c1])


def test_check_names_lists_every_problem_at_once():
    specs = [ParamSpec("a", (2, 3), 0, "normal"), ParamSpec("b", (4,), None, "norm")]
    with pytest.raises(sources.SourceError) as e:
        sources.check_names({"a": (3, 2), "c": (1,)}, specs, "ckpt X")
    msg = str(e.value)
    assert "a: shape [3, 2]" in msg and "b: missing" in msg and "c: not part of the model" in msg and "+model" in msg


# ------------------------------------------------------------------------------- dcp and hf, end to end


def rms_norm(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def titan_forward(w: dict[str, torch.Tensor], tokens: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """torchtitan's Llama (either set of names): complex rotary over interleaved pairs; GQA; SwiGLU; untied output."""
    names = titan.detect(w)
    t = tokens.shape[0]
    freqs = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    rot = torch.polar(
        torch.ones(t, HEAD_DIM // 2, dtype=torch.float64), torch.outer(torch.arange(t, dtype=torch.float64), freqs)
    ).to(torch.complex64)

    def rope(x):
        xc = torch.view_as_complex(x.reshape(t, x.shape[1], HEAD_DIM // 2, 2).contiguous())
        return torch.view_as_real(xc * rot[:, None, :]).reshape(x.shape)

    h = w["tok_embeddings.weight"][tokens]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(2):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"])
        qkv = p + names.qkv
        q = rope((x @ w[qkv + "wq.weight"].T).view(t, N_HEADS, HEAD_DIM))
        k = rope((x @ w[qkv + "wk.weight"].T).view(t, N_KV, HEAD_DIM)).repeat_interleave(N_HEADS // N_KV, 1)
        v = (x @ w[qkv + "wv.weight"].T).view(t, N_KV, HEAD_DIM).repeat_interleave(N_HEADS // N_KV, 1)
        att = torch.softmax(torch.einsum("thd,shd->hts", q, k) / math.sqrt(HEAD_DIM) + mask, dim=-1)
        h = h + torch.einsum("hts,shd->thd", att, v).reshape(t, -1) @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"])
        ff = F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)
        h = h + ff @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(h, w["norm.weight"]) @ w[names.head].T


def _convert_on_ranks(rank: int, world_size: int, dcp_dir: str, hf_dir: str, relaid_dir: str) -> None:
    from hydra import compose, initialize_config_dir

    from launcher import save
    from launcher.session import CONFIG_DIR

    common = [*TINY, f"world.nproc_per_node={world_size}", "output.max_shard_size=64KB"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        to_hf = compose(
            "save", [*common, "source=dcp", f"source.path={dcp_dir}", f"output.dir={hf_dir}", "output.dtype=float32"]
        )
        relaid = compose(
            "save",
            [
                *common,
                "source=hf",
                f"source.path={hf_dir}",
                f"output.dir={relaid_dir}",
                "output.dtype=bfloat16",
                "output.max_shard_size=1MB",
            ],
        )
    save.run(to_hf)
    save.run(relaid)


@pytest.fixture(scope="module", params=[titan.CURRENT, titan.LEGACY], ids=["current", "legacy"])
def converted(request, tmp_path_factory):
    """A torchtitan DCP checkpoint under each set of names, converted to HF at 2 ranks, then re-laid out."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("dcp")
    sd = titan_state(seed=1, names=request.param)
    extras = {
        "lr_scheduler.last_epoch": torch.tensor(100),
        "optimizer.state.x": torch.zeros(3),
        "optimizer.state.layers.0.attention.wq.weight.exp_avg": torch.zeros(2),
    }  # not a model key
    dcp.save(sd | extras, checkpoint_id=str(root / "titan"), no_dist=True)
    run_ranks(_convert_on_ranks, 2, str(root / "titan"), str(root / "hf"), str(root / "relaid"))
    return sd, root


@pytest.mark.slow
def test_dcp_source_converts_with_the_rotary_permutation(converted):
    sd, root = converted
    want = titan.to_hf(sd, N_HEADS, N_KV)
    got = {}
    for f in sorted((root / "hf").glob("*.safetensors")):
        got |= load_file(f)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_transformers_llama_computes_the_torchtitan_logits(converted):
    from transformers import LlamaForCausalLM

    sd, root = converted
    model = LlamaForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 259, (12,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens[None]).logits[0]
    ref = titan_forward(sd, tokens)
    assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4), (logits - ref).abs().max()
    # and the permutation matters: without it the logits differ
    plain = {titan.hf_name(k): v for k, v in sd.items()}
    model.load_state_dict(plain)
    with torch.no_grad():
        assert not torch.allclose(model(tokens[None]).logits[0], ref, atol=1e-2)


@pytest.mark.slow
def test_hf_source_relays_out_and_casts_in_parallel(converted):
    sd, root = converted
    want = {k: v.to(torch.bfloat16) for k, v in titan.to_hf(sd, N_HEADS, N_KV).items()}
    small = sorted((root / "hf").glob("*.safetensors"))
    big = sorted((root / "relaid").glob("*.safetensors"))
    assert len(big) < len(small)
    got = {}
    for f in big:
        got |= load_file(f)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
