"""Exceptions raised by :mod:`hf_storage`. Every error names the cause and, where there is one, the fix."""

from __future__ import annotations

__all__ = [
    "HFStorageError",
    "CheckpointFormatError",
    "StateDictMismatchError",
    "UnsupportedEntryError",
    "LayoutError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "SaveError",
]


class HFStorageError(Exception):
    """Base class of every error this package raises on purpose."""


class PeerFailure(HFStorageError):
    """Another rank died or hung inside a collective of the save; no further collective can complete."""


class CheckpointFormatError(HFStorageError, ValueError):
    """A file or index on disk breaks the safetensors / Hugging Face checkpoint format."""


class StateDictMismatchError(HFStorageError, ValueError):
    """The target state dict and the checkpoint disagree (missing keys, shapes, dtypes)."""


class UnsupportedEntryError(HFStorageError, TypeError):
    """The state dict holds something the safetensors format cannot store (non-tensors, odd dtypes)."""


class LayoutError(HFStorageError, ValueError):
    """The requested file layout is impossible (bad max_shard_size, incomplete fqn_to_index_mapping...)."""


class CheckpointExistsError(HFStorageError, FileExistsError):
    """The output path already holds a checkpoint and the overwrite policy forbids replacing it."""


def format_keys(keys, limit: int = 20) -> str:
    """Render a list of keys for an error message, eliding the tail of very long lists."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    if len(keys) > limit:
        shown += f", ... ({len(keys) - limit} more)"
    return shown


class CheckpointLockedError(HFStorageError):
    """Another save of the same target is in progress; the message names it (host, pid, start time)."""


class SaveError(HFStorageError):
    """A save failed on one or more ranks; raised on every rank with the same message. ``failures`` maps each
    failing rank to what went wrong there."""

    def __init__(self, message: str, failures: dict[int, str] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})
