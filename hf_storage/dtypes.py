"""safetensors dtype names <-> torch dtypes, bit widths, and the host byte order the format needs.

safetensors names 22 dtypes; a recent torch has all but the two 6-bit floats (``F6_E2M3``, ``F6_E3M2``). Every
name the format defines is *known* here, with its bit width, so that a header is validated in full even
when this torch build has no type for a dtype; such a tensor is only refused when it is actually loaded
(:func:`unloadable` says why). Names outside the format are a :class:`CheckpointFormatError`.

``F4`` is 4 bits per element and torch has no 4-bit element type: ``torch.float4_e2m1fn_x2`` packs two
fp4 values into one byte-sized element. safetensors counts fp4 values in the header shape, so a torch
tensor of shape ``[..., n]`` is stored with shape ``[..., 2n]`` (the same bytes); :func:`header_shape` and
:func:`torch_shape` convert. A 0-dim packed tensor holds two values and has no safetensors shape.
"""

from __future__ import annotations

import sys

import torch

from .errors import CheckpointFormatError, HFStorageError, UnsupportedEntryError

# safetensors name -> (bits per element, torch dtype attribute or None where torch has no such type).
_FORMAT: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"),
    "U8": (8, "uint8"),
    "U16": (16, "uint16"),
    "U32": (32, "uint32"),
    "U64": (64, "uint64"),
    "I8": (8, "int8"),
    "I16": (16, "int16"),
    "I32": (32, "int32"),
    "I64": (64, "int64"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "F32": (32, "float32"),
    "F64": (64, "float64"),
    "C64": (64, "complex64"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "F8_E8M0": (8, "float8_e8m0fnu"),  # MX block scales
    "F4": (4, "float4_e2m1fn_x2"),  # torch packs two fp4 values per element, see the module docstring
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
}

BITS: dict[str, int] = {st: bits for st, (bits, _) in _FORMAT.items()}
"""Bits per element of every safetensors dtype name, whether or not this torch build has the type."""

# Only the dtypes this torch build has (uint16..64 arrived in 2.3, fp8 in 2.1, e8m0 and fp4 later).
_TO_TORCH: dict[str, torch.dtype] = {
    st: getattr(torch, name) for st, (_, name) in _FORMAT.items() if name and hasattr(torch, name)
}
_TO_ST: dict[torch.dtype, str] = {dt: st for st, dt in _TO_TORCH.items()}

PACKED: dict[torch.dtype, int] = {_TO_TORCH["F4"]: 2} if "F4" in _TO_TORCH else {}
"""torch dtypes one element of which holds several safetensors elements (along the last dimension)."""

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_TO_ST)


def check_host() -> None:
    """Refuse big-endian hosts: safetensors data is little-endian and this library never byte-swaps."""
    if sys.byteorder != "little":
        raise HFStorageError(
            f"this host is {sys.byteorder}-endian; safetensors stores little-endian data and hf_storage writes "
            "and reads tensor bytes as they are in memory, without byte-swapping. Save and load on a "
            "little-endian host (x86-64, aarch64), or use safetensors.torch, which byte-swaps."
        )


def to_safetensors(dtype: torch.dtype, name: str = "") -> str:
    """The safetensors name of ``dtype``; raises for dtypes the format cannot hold."""
    try:
        return _TO_ST[dtype]
    except KeyError:
        where = f" (tensor {name!r})" if name else ""
        raise UnsupportedEntryError(
            f"dtype {dtype}{where} has no safetensors equivalent; supported: "
            f"{', '.join(str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES)}. "
            "Cast the tensor before saving."
        ) from None


def to_torch(name: str, tensor: str = "") -> torch.dtype:
    """The torch dtype of a safetensors dtype name.

    Raises :class:`CheckpointFormatError` for a name the format does not define, and
    :class:`UnsupportedEntryError` for a format dtype this torch build has no type for.
    """
    try:
        return _TO_TORCH[name]
    except (KeyError, TypeError):
        where = f" for tensor {tensor!r}" if tensor else ""
        if isinstance(name, str) and name in BITS:
            raise UnsupportedEntryError(f"safetensors dtype {name}{where}: {_no_torch_type()}") from None
        raise CheckpointFormatError(f"unknown safetensors dtype {name!r}{where}; known: {', '.join(BITS)}") from None


_PLAIN = frozenset(st for st, dt in _TO_TORCH.items() if dt not in PACKED)


def unloadable(name: str, shape: tuple[int, ...]) -> str | None:
    """Why a (validated) header entry of dtype ``name`` and ``shape`` cannot become a torch tensor; None if it can."""
    if name in _PLAIN and name in _TO_TORCH:  # the usual case, once per tensor of a checkpoint
        return None
    if name not in _TO_TORCH:
        return f"is stored as {name}, and {_no_torch_type()}"
    pack = PACKED.get(_TO_TORCH[name], 1)
    if pack > 1 and (not shape or shape[-1] % pack):
        last = shape[-1] if shape else "none (0-dim)"
        return (
            f"is stored as {name} with last dimension {last}, which {_TO_TORCH[name]} cannot hold (it packs "
            f"{pack} values per element along the last dimension); re-save it with an even last dimension"
        )
    return None


def header_shape(dtype: torch.dtype, shape: tuple[int, ...], name: str = "") -> tuple[int, ...]:
    """The safetensors header shape of a torch tensor: packed dtypes count each stored value."""
    pack = PACKED.get(dtype, 1)
    if pack == 1:
        return tuple(shape)
    if not shape:
        raise UnsupportedEntryError(
            f"tensor {name!r}: a 0-dim {dtype} holds {pack} values, which no safetensors shape can express; "
            "reshape it to [1] before saving"
        )
    return (*shape[:-1], shape[-1] * pack)


def torch_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a header shape (inverse of :func:`header_shape`; see :func:`unloadable` first)."""
    pack = PACKED.get(dtype, 1)
    return tuple(shape) if pack == 1 else (*shape[:-1], shape[-1] // pack)


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per torch element; packed dtypes (``float4_e2m1fn_x2``) count one byte per pair of values."""
    return dtype.itemsize


def _no_torch_type() -> str:
    return (
        f"torch {torch.__version__} has no type for it; upgrade torch to a version that has one, or load "
        "without this key (drop it from the state dict; the other keys load)"
    )
