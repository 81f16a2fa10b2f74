"""Hugging Face safetensors checkpoints for ``torch.distributed.checkpoint``, written in one pass.

Every rank writes its own bytes straight into the final ``model-0000i-of-0000N.safetensors`` files (column
shards are first assembled into whole rows with the other ranks of their node, :mod:`.row_assembly`); rank 0
writes ``model.safetensors.index.json`` last, after every rank finished, and publishes the directory
atomically. The reader loads any HF checkpoint into any sharded layout, reading only the bytes each rank
needs.

    import hf_storage
    hf_storage.save(model.state_dict(), "/ckpt/step-1000", max_shard_size="5GB")   # on every rank
    hf_storage.load(model.state_dict(), "/ckpt/step-1000")

or, with DCP::

    dcp.save(state_dict, storage_writer=hf_storage.HuggingFaceStorageWriter("/ckpt/step-1000"))
    dcp.load(state_dict, storage_reader=hf_storage.HuggingFaceStorageReader("/ckpt/step-1000"))

Every path may also be an object-store URI, ``s3://bucket/prefix`` (:mod:`.remote`, :mod:`.objstore`).
"""

from .api import LoadSummary, SaveSummary, async_save, load, save
from .background import SaveInProgressError
from .box import Box
from .dcp import HuggingFaceStorageReader, HuggingFaceStorageWriter
from .errors import (
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointLockedError,
    HFStorageError,
    LayoutError,
    SaveError,
    StateDictMismatchError,
    UnsupportedEntryError,
)
from .layout import Layout, TensorSpec, parse_size, plan
from .manager import CheckpointManager
from .objstore import ObjectChangedError, ObjectStoreError, ObjectStoreThrottledError, ObjectStoreUnreachableError
from .reader import open_checkpoint

__all__ = [
    "save",
    "async_save",
    "load",
    "SaveInProgressError",
    "CheckpointManager",
    "SaveSummary",
    "LoadSummary",
    "HuggingFaceStorageWriter",
    "HuggingFaceStorageReader",
    "open_checkpoint",
    "plan",
    "parse_size",
    "Layout",
    "TensorSpec",
    "HFStorageError",
    "CheckpointFormatError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "SaveError",
    "ObjectStoreError",
    "ObjectStoreThrottledError",
    "ObjectStoreUnreachableError",
    "ObjectChangedError",
    "Box",
    "StateDictMismatchError",
    "UnsupportedEntryError",
    "LayoutError",
]
