"""Llama-shaped state dicts as pure metadata: names, global shapes, and where each tensor is sharded.

Shared by the speed benchmark (:mod:`bench.run`, which materialises a small llama-like model) and the
scale simulation (:mod:`bench.scale`, which never allocates a tensor). Shapes follow the Hugging Face
``LlamaForCausalLM`` names; the three reference configs are read from ``configs/model/*.yaml`` when the
launcher ships them and otherwise fall back to the published HF ``config.json`` values below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Published Hugging Face config.json values (meta-llama/Llama-3.1-{8B,70B,405B}).
LLAMA_CONFIGS: dict[str, dict[str, int]] = {
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "llama-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "llama-405b": dict(
        hidden_size=16384,
        intermediate_size=53248,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}
_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
_YAML_STEMS = {"llama-8b": "llama3_8b", "llama-70b": "llama3_70b", "llama-405b": "llama3_405b"}


@dataclass(frozen=True)
class Param:
    """One tensor of the model: its HF name, global shape, and the dimension tensor parallelism splits.

    ``tp_dim`` is None for tensors that TP replicates (norms). FSDP always shards dimension 0.
    """

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None


def _find_fields(node) -> dict[str, int] | None:
    """The first mapping in a (nested) YAML document that holds every HF config field we need."""
    if isinstance(node, dict):
        if all(k in node for k in _FIELDS):
            found = {k: int(node[k]) for k in _FIELDS}
            if node.get("tie_word_embeddings"):
                found["tie_word_embeddings"] = 1
            return found
        for v in node.values():
            found = _find_fields(v)
            if found:
                return found
    return None


def load_config(name: str) -> tuple[dict[str, int], str]:
    """``(config, source)``: from ``configs/model/<name>.yaml`` when present, else the built-in table."""
    import yaml

    for stem in (_YAML_STEMS.get(name, name), name, name.replace("-", "_")):
        path = REPO / "configs" / "model" / f"{stem}.yaml"
        if path.is_file():
            found = _find_fields(yaml.safe_load(path.read_text()))
            if found:
                return found, str(path.relative_to(REPO))
    return dict(LLAMA_CONFIGS[name]), "built-in HF config values"


def llama_params(cfg: dict[str, int]) -> list[Param]:
    """Every tensor of a Llama model with Megatron/torchtitan-style TP dimensions.

    Column-parallel (q, k, v, gate, up, lm_head, embedding rows) split dim 0; row-parallel (o, down)
    split dim 1; norms are replicated across TP. With ``tie_word_embeddings`` there is no ``lm_head``.
    """
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    out = [Param("model.embed_tokens.weight", (v, h), 0)]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            Param(p + "self_attn.q_proj.weight", (h, h), 0),
            Param(p + "self_attn.k_proj.weight", (kv, h), 0),
            Param(p + "self_attn.v_proj.weight", (kv, h), 0),
            Param(p + "self_attn.o_proj.weight", (h, h), 1),
            Param(p + "mlp.gate_proj.weight", (i, h), 0),
            Param(p + "mlp.up_proj.weight", (i, h), 0),
            Param(p + "mlp.down_proj.weight", (h, i), 1),
            Param(p + "input_layernorm.weight", (h,), None),
            Param(p + "post_attention_layernorm.weight", (h,), None),
        ]
    out.append(Param("model.norm.weight", (h,), None))
    if not cfg.get("tie_word_embeddings"):
        out.append(Param("lm_head.weight", (v, h), 0))
    return out


def llama_like(target_bytes: int, itemsize: int = 2) -> dict[str, int]:
    """A small llama-shaped config whose bf16 state is close to ``target_bytes``.

    The widest hidden size (2048 down to 64) that still fits the embeddings and two layers is used, and
    then as many layers as fill the target; vocab is 16 x hidden so the embeddings stay a minority. Every
    dimension is a multiple of 32 so rows and columns split evenly over 2, 4 and 2 x 2 meshes.
    """
    for h in (2048, 1024, 512, 256, 128, 64):
        cfg = dict(
            hidden_size=h,
            intermediate_size=(h * 11 // 4 + 31) // 32 * 32,
            num_hidden_layers=1,
            num_attention_heads=max(1, h // 128),
            num_key_value_heads=max(1, h // 512),
            vocab_size=16 * h,
        )
        per_layer = state_bytes({**cfg, "num_hidden_layers": 1}, itemsize) - state_bytes(
            {**cfg, "num_hidden_layers": 0}, itemsize
        )
        fixed = state_bytes({**cfg, "num_hidden_layers": 0}, itemsize)
        if fixed + 2 * per_layer <= target_bytes or h == 64:
            cfg["num_hidden_layers"] = max(1, round((target_bytes - fixed) / per_layer))
            return cfg
    raise AssertionError("unreachable")


def state_bytes(cfg: dict[str, int], itemsize: int = 2) -> int:
    return sum(math.prod(p.shape) for p in llama_params(cfg)) * itemsize
