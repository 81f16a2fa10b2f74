"""Key adapter between torchtitan's Llama state dict and Hugging Face's ``LlamaForCausalLM``. Pure: no I/O.

    layers.N.attention.wq.weight        <-> model.layers.N.self_attn.q_proj.weight   (rotary rows permuted)
    layers.N.attention.wk.weight        <-> model.layers.N.self_attn.k_proj.weight   (rotary rows permuted)
    layers.N.attention.wv/wo.weight     <-> model.layers.N.self_attn.v_proj/o_proj.weight
    layers.N.feed_forward.w1/w2/w3      <-> model.layers.N.mlp.gate_proj/down_proj/up_proj
    layers.N.attention_norm / ffn_norm  <-> model.layers.N.input_layernorm / post_attention_layernorm
    tok_embeddings / norm / output      <-> model.embed_tokens / model.norm / lm_head

torchtitan (like Meta's reference code) rotates interleaved pairs ``(x0, x1), (x2, x3), ...`` of each head;
HF rotates the two halves ``(x0, x_{d/2}), (x1, x_{d/2+1}), ...``. To give the same attention scores, the
rows of wq and wk are reordered inside every head: row ``2i`` goes to ``i``, row ``2i+1`` to ``d/2 + i``.
As the permutation never leaves a head, a rank that holds rows ``[a, b)`` of an HF q/k weight needs only
the source rows of the heads overlapping ``[a, b)`` (:func:`source_box`, :func:`hf_rows_from_source`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_TITAN_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ROTARY = {"self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k"}


class UnknownKeyError(ValueError):
    """A name the adapter has no mapping for."""


def _map(name: str, top: Mapping[str, str], layer: Mapping[str, str], pattern: re.Pattern, prefix: str) -> str:
    if name in top:
        return top[name]
    m = pattern.match(name)
    if m and m.group(2) in layer:
        return f"{prefix}{m.group(1)}.{layer[m.group(2)]}"
    raise UnknownKeyError(f"no torchtitan <-> Hugging Face mapping for {name!r}")


def hf_name(titan_name: str) -> str:
    return _map(titan_name, _TOP, _LAYER, _TITAN_LAYER, "model.layers.")


def titan_name(hf_name_: str) -> str:
    return _map(hf_name_, _TOP_INV, _LAYER_INV, _HF_LAYER, "layers.")


def rotary(hf_name_: str) -> str | None:
    """``"q"`` / ``"k"`` for the weights whose rows the rotary convention permutes, else None."""
    m = _HF_LAYER.match(hf_name_)
    return _ROTARY.get(m.group(2)) if m else None


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of every head from torchtitan's interleaved-pair order to HF's halves order."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_halves`."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _heads(kind: str | None, n_heads: int, n_kv_heads: int) -> int:
    return n_heads if kind == "q" else n_kv_heads


def to_hf(state: Mapping[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """A full torchtitan Llama state dict with HF names and HF's rotary row order."""
    out = {}
    for name, t in state.items():
        hf = hf_name(name)
        kind = rotary(hf)
        out[hf] = interleaved_to_halves(t, _heads(kind, n_heads, n_kv_heads)) if kind else t
    return out


def from_hf(state: Mapping[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_hf`."""
    out = {}
    for name, t in state.items():
        kind = rotary(name)
        out[titan_name(name)] = halves_to_interleaved(t, _heads(kind, n_heads, n_kv_heads)) if kind else t
    return out


def source_box(hf_name_: str, offsets: tuple[int, ...], sizes: tuple[int, ...],
               head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box of the torchtitan tensor needed for the box ``(offsets, sizes)`` of the HF tensor.

    The same box, except for q/k weights, whose rows grow to whole heads.
    """
    if rotary(hf_name_) is None or sizes[0] == 0:
        return offsets, sizes
    lo = offsets[0] // head_dim * head_dim
    hi = -(-(offsets[0] + sizes[0]) // head_dim) * head_dim
    return (lo, *offsets[1:]), (hi - lo, *sizes[1:])


def hf_rows_from_source(hf_name_: str, source: torch.Tensor, source_offsets: tuple[int, ...],
                        offsets: tuple[int, ...], sizes: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """This rank's HF box from the torchtitan box :func:`source_box` returned (read into ``source``)."""
    if rotary(hf_name_) is None or sizes[0] == 0:
        return source
    halves = interleaved_to_halves(source, source.shape[0] // head_dim)
    return halves[offsets[0] - source_offsets[0]: offsets[0] - source_offsets[0] + sizes[0]]
