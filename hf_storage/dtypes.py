"""torch dtype <-> safetensors dtype names, for the dtypes both sides share."""

from __future__ import annotations

import torch

from .errors import CheckpointFormatError, UnsupportedEntryError

_PAIRS: list[tuple[str, str]] = [
    ("BOOL", "bool"),
    ("U8", "uint8"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("I8", "int8"),
    ("I16", "int16"),
    ("I32", "int32"),
    ("I64", "int64"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("F32", "float32"),
    ("F64", "float64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("C64", "complex64"),
]

# Only the dtypes this torch build has (uint16..64 arrived in 2.3, fp8 in 2.1).
_TO_TORCH: dict[str, torch.dtype] = {
    st: getattr(torch, name) for st, name in _PAIRS if hasattr(torch, name)
}
_TO_ST: dict[torch.dtype, str] = {dt: st for st, dt in _TO_TORCH.items()}

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_TO_ST)


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
    """The torch dtype of a safetensors dtype name; raises :class:`CheckpointFormatError` if unknown."""
    try:
        return _TO_TORCH[name]
    except (KeyError, TypeError):
        where = f" for tensor {tensor!r}" if tensor else ""
        raise CheckpointFormatError(
            f"unknown safetensors dtype {name!r}{where}; known: {', '.join(_TO_TORCH)}"
        ) from None


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize
