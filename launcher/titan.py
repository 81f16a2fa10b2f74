"""Key adapter between torchtitan's Llama 3 state dict and Hugging Face's ``LlamaForCausalLM``. Pure: no I/O.

torchtitan has used two sets of names; the set in a checkpoint is read from its keys (:func:`detect`):

    torchtitan (CURRENT, main since 2026-04)   torchtitan (LEGACY, v0.1-v0.2.2)  Hugging Face
    layers.N.attention.qkv_linear.wq.weight    layers.N.attention.wq.weight      model.layers.N.self_attn.q_proj.weight
    layers.N.attention.qkv_linear.wk.weight    layers.N.attention.wk.weight      model.layers.N.self_attn.k_proj.weight
    layers.N.attention.qkv_linear.wv.weight    layers.N.attention.wv.weight      model.layers.N.self_attn.v_proj.weight
    lm_head.weight                             output.weight                     lm_head.weight

and in both: ``layers.N.attention.wo`` <-> ``self_attn.o_proj``, ``layers.N.feed_forward.w1/w2/w3`` <->
``mlp.gate_proj/down_proj/up_proj``, ``layers.N.attention_norm / ffn_norm`` <-> ``input_layernorm /
post_attention_layernorm``, ``tok_embeddings / norm`` <-> ``model.embed_tokens / model.norm``.
(torchtitan's ``Llama3StateDictAdapter``: ``qkv_linear`` since pytorch/torchtitan#2878, ``lm_head`` since
#2937; a fused ``qkv_linear.wqkv`` is saved as wq/wk/wv since #3656 and refused here before that.)

torchtitan (like Meta's reference code) rotates interleaved pairs ``(x0, x1), (x2, x3), ...`` of each head;
HF rotates the two halves ``(x0, x_{d/2}), (x1, x_{d/2+1}), ...``. To give the same attention scores, the
rows of wq and wk are reordered inside every head: row ``2i`` goes to ``i``, row ``2i+1`` to ``d/2 + i``.
As the permutation never leaves a head, a rank that holds rows ``[a, b)`` of an HF q/k weight needs only
the source rows of the heads overlapping ``[a, b)`` (:func:`source_box`, :func:`hf_rows_from_source`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TitanNames:
    """One torchtitan naming of the Llama 3 state dict: where q/k/v live and what the output layer is called."""

    qkv: str  # the module path of wq / wk / wv inside a layer
    head: str  # the output projection's key

    def describe(self) -> str:
        return f"torchtitan names layers.N.{self.qkv}wq.weight, {self.head}"


CURRENT = TitanNames(qkv="attention.qkv_linear.", head="lm_head.weight")
LEGACY = TitanNames(qkv="attention.", head="output.weight")
_QKV_STYLES = (CURRENT.qkv, LEGACY.qkv)
_HEADS = (CURRENT.head, LEGACY.head)

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_LAYER = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_QKV = {
    "wq.weight": "self_attn.q_proj.weight",
    "wk.weight": "self_attn.k_proj.weight",
    "wv.weight": "self_attn.v_proj.weight",
}
_TITAN_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TITAN_QKV = re.compile(r"^layers\.\d+\.(attention\.(?:qkv_linear\.)?)(wq|wk|wv|wqkv)\.weight$")
_ROTARY = {"self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k"}


class UnknownKeyError(ValueError):
    """A name the adapter has no mapping for, or a checkpoint whose names match no known torchtitan set."""


@functools.cache
def _tables(names: TitanNames, inverse: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """``(top level, per layer)``: torchtitan name -> HF name for one set of names (``inverse``: HF -> titan)."""
    top, layer = _TOP | {names.head: "lm_head.weight"}, _LAYER | {names.qkv + k: v for k, v in _QKV.items()}
    if inverse:
        return {v: k for k, v in top.items()}, {v: k for k, v in layer.items()}
    return top, layer


def _map(name: str, top: Mapping[str, str], layer: Mapping[str, str], pattern: re.Pattern, prefix: str) -> str:
    if name in top:
        return top[name]
    m = pattern.match(name)
    if m and m.group(2) in layer:
        return f"{prefix}{m.group(1)}.{layer[m.group(2)]}"
    raise UnknownKeyError(f"no torchtitan <-> Hugging Face mapping for {name!r}")


def hf_name(titan_name_: str) -> str:
    """The HF name of a torchtitan name of either set (the two never map one name differently)."""
    for names in (CURRENT, LEGACY):
        top, layer = _tables(names)
        try:
            return _map(titan_name_, top, layer, _TITAN_LAYER, "model.layers.")
        except UnknownKeyError:
            continue
    raise UnknownKeyError(f"no torchtitan <-> Hugging Face mapping for {titan_name_!r}")


def titan_name(hf_name_: str, names: TitanNames = CURRENT) -> str:
    """The torchtitan name of an HF name, in the set ``names`` (a checkpoint's: :func:`detect`)."""
    return _map(hf_name_, *_tables(names, inverse=True), _HF_LAYER, "layers.")


def detect(keys: Iterable[str], prefix: str = "") -> TitanNames:
    """The set of names a torchtitan state dict (or a DCP checkpoint's metadata keys) uses.

    q/k/v and the output layer are read separately, so the short-lived mix of April 2026 (``qkv_linear``
    with ``output.weight``) is read too; with no such key (a checkpoint without layers) the answer is CURRENT.
    """
    styles, heads = set(), set()
    for key in keys:
        name = key[len(prefix) :] if key.startswith(prefix) else None
        m = _TITAN_QKV.match(name) if name is not None else None
        if m and m.group(2) == "wqkv":
            raise UnknownKeyError(
                f"{key!r} is a fused q/k/v weight (torchtitan's FusedQKVLinear before "
                "pytorch/torchtitan#3656, 2026-06-19), which this adapter does not split: load "
                "the run in a later torchtitan, which saves wq/wk/wv, and save it again"
            )
        if m:
            styles.add(m.group(1))
        elif name in _HEADS:
            heads.add(name)
    if len(styles) > 1 or len(heads) > 1:
        found = sorted(f"layers.N.{s}wq.weight" for s in styles) + sorted(heads)
        raise UnknownKeyError(
            f"the checkpoint mixes torchtitan's two sets of names ({', '.join(found)}); "
            f"does source.key_prefix={prefix!r} select one model?"
        )
    qkv = styles.pop() if styles else CURRENT.qkv
    head = heads.pop() if heads else {CURRENT.qkv: CURRENT.head, LEGACY.qkv: LEGACY.head}[qkv]
    return TitanNames(qkv, head)


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
    """A full torchtitan Llama state dict (either set of names) with HF names and HF's rotary row order."""
    detect(state)  # refuses fused q/k/v and a mix of the two sets
    out = {}
    for name, t in state.items():
        hf = hf_name(name)
        kind = rotary(hf)
        out[hf] = interleaved_to_halves(t, _heads(kind, n_heads, n_kv_heads)) if kind else t
    return out


def from_hf(
    state: Mapping[str, torch.Tensor], n_heads: int, n_kv_heads: int, names: TitanNames = CURRENT
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_hf`, with the torchtitan ``names`` asked for."""
    out = {}
    for name, t in state.items():
        kind = rotary(name)
        out[titan_name(name, names)] = halves_to_interleaved(t, _heads(kind, n_heads, n_kv_heads)) if kind else t
    return out


def source_box(
    hf_name_: str, offsets: tuple[int, ...], sizes: tuple[int, ...], head_dim: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box of the torchtitan tensor needed for the box ``(offsets, sizes)`` of the HF tensor.

    The same box, except for q/k weights, whose rows grow to whole heads.
    """
    if rotary(hf_name_) is None or sizes[0] == 0:
        return offsets, sizes
    lo = offsets[0] // head_dim * head_dim
    hi = -(-(offsets[0] + sizes[0]) // head_dim) * head_dim
    return (lo, *offsets[1:]), (hi - lo, *sizes[1:])


def hf_rows_from_source(
    hf_name_: str,
    source: torch.Tensor,
    source_offsets: tuple[int, ...],
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    head_dim: int,
) -> torch.Tensor:
    """This rank's HF box from the torchtitan box :func:`source_box` returned (read into ``source``)."""
    if rotary(hf_name_) is None or sizes[0] == 0:
        return source
    halves = interleaved_to_halves(source, source.shape[0] // head_dim)
    return halves[offsets[0] - source_offsets[0] : offsets[0] - source_offsets[0] + sizes[0]]
