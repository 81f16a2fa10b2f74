"""Model architectures as data: Hugging Face FQNs, global shapes, tensor-parallel roles and config.json.

Pure functions of the ``model`` config (HF ``LlamaConfig`` field names); no tensors are made here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from .config import DType

COLWISE, ROWWISE = 0, 1  # the tensor dimension tensor parallelism splits

TORCH_DTYPES: dict[DType, torch.dtype] = {
    DType.float32: torch.float32,
    DType.bfloat16: torch.bfloat16,
    DType.float16: torch.float16,
    DType.float64: torch.float64,
}


class ModelConfigError(ValueError):
    """The model config cannot describe a working model; the message names the key and the fix."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: HF name, global shape, the dim TP splits (None: replicated over TP), its init."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    init: str  # "normal": N(0, std); "norm": 1 + N(0, std) (RMSNorm weights)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parse_dtype(name: DType | str, key: str) -> torch.dtype:
    """``DType.bf16`` or ``"bf16"`` -> ``torch.bfloat16``; ``key`` names the config key in the error.

    A composed config holds :class:`DType` members already (the schema validated them); strings are for
    callers outside Hydra.
    """
    if isinstance(name, DType):
        return TORCH_DTYPES[name]
    try:
        return TORCH_DTYPES[DType[str(name).lower().removeprefix("torch.")]]
    except KeyError:
        raise ModelConfigError(f"{key}={name!r} is not a dtype; use one of {', '.join(DType.__members__)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def head_dim(m) -> int:
    return m.head_dim if m.head_dim is not None else m.hidden_size // m.num_attention_heads


def check_model(m) -> None:
    """Raise :class:`ModelConfigError` naming every impossible value at once."""
    problems = []
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        if m[key] < 1:
            problems.append(f"model.{key}={m[key]} must be >= 1")
    if problems:
        raise ModelConfigError("; ".join(problems))
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        problems.append(
            f"model.hidden_size={m.hidden_size} is not a multiple of model.num_attention_heads="
            f"{m.num_attention_heads}; change one or set model.head_dim"
        )
    if m.head_dim is not None and (m.head_dim < 2 or m.head_dim % 2):
        problems.append(f"model.head_dim={m.head_dim} must be even (rotary embeddings rotate pairs)")
    elif m.head_dim is None and head_dim(m) % 2:
        problems.append(f"the head dim hidden_size/num_attention_heads={head_dim(m)} must be even")
    if m.num_attention_heads % m.num_key_value_heads:
        problems.append(
            f"model.num_attention_heads={m.num_attention_heads} is not a multiple of "
            f"model.num_key_value_heads={m.num_key_value_heads}"
        )
    if problems:
        raise ModelConfigError("; ".join(problems))


def _layer_specs(m, i: int) -> list[ParamSpec]:
    h, hd, inter = m.hidden_size, head_dim(m), m.intermediate_size
    q, kv = m.num_attention_heads * hd, m.num_key_value_heads * hd
    p = f"model.layers.{i}."
    specs = [
        ParamSpec(p + "input_layernorm.weight", (h,), None, "norm"),
        ParamSpec(p + "self_attn.q_proj.weight", (q, h), COLWISE, "normal"),
        ParamSpec(p + "self_attn.k_proj.weight", (kv, h), COLWISE, "normal"),
        ParamSpec(p + "self_attn.v_proj.weight", (kv, h), COLWISE, "normal"),
        ParamSpec(p + "self_attn.o_proj.weight", (h, q), ROWWISE, "normal"),
        ParamSpec(p + "post_attention_layernorm.weight", (h,), None, "norm"),
        ParamSpec(p + "mlp.gate_proj.weight", (inter, h), COLWISE, "normal"),
        ParamSpec(p + "mlp.up_proj.weight", (inter, h), COLWISE, "normal"),
        ParamSpec(p + "mlp.down_proj.weight", (h, inter), ROWWISE, "normal"),
    ]
    if m.attention_bias:
        specs += [
            ParamSpec(p + f"self_attn.{n}_proj.bias", (size,), COLWISE, "normal")
            for n, size in (("q", q), ("k", kv), ("v", kv))
        ]
        specs.append(ParamSpec(p + "self_attn.o_proj.bias", (h,), None, "normal"))
    if m.mlp_bias:
        specs += [ParamSpec(p + f"mlp.{n}_proj.bias", (inter,), COLWISE, "normal") for n in ("gate", "up")]
        specs.append(ParamSpec(p + "mlp.down_proj.bias", (h,), None, "normal"))
    return specs


def param_specs(m) -> list[ParamSpec]:
    """Every parameter of the HF ``LlamaForCausalLM`` state dict, in module order.

    ``lm_head.weight`` is left out when ``tie_word_embeddings`` is set, as ``save_pretrained`` does.
    """
    specs = [ParamSpec("model.embed_tokens.weight", (m.vocab_size, m.hidden_size), COLWISE, "normal")]
    for i in range(m.num_hidden_layers):
        specs += _layer_specs(m, i)
    specs.append(ParamSpec("model.norm.weight", (m.hidden_size,), None, "norm"))
    if not m.tie_word_embeddings:
        specs.append(ParamSpec("lm_head.weight", (m.vocab_size, m.hidden_size), COLWISE, "normal"))
    return specs


def hf_config(m, dtype: torch.dtype) -> dict:
    """The ``config.json`` dict: the model keys, ``head_dim`` filled in, ``torch_dtype`` the dtype saved."""
    cfg = OmegaConf.to_container(m, resolve=True) if isinstance(m, DictConfig) else dict(vars(m))
    cfg["head_dim"] = head_dim(m)
    if cfg.get("rope_scaling") is None:
        cfg.pop("rope_scaling", None)
    cfg["torch_dtype"] = dtype_name(dtype)
    return cfg
