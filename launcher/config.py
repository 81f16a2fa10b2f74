"""Config schemas of the launcher apps, registered in Hydra's ConfigStore, and the resolvers they use.

Each config group stores its schema as the option ``schema`` (``model/schema``, ``world/schema`` ...); every
YAML option of the group starts with ``defaults: [schema, _self_]``. Each app's primary config starts its
defaults list with the app's top-level schema (``save_schema``: :class:`SaveConfig`, ``load_schema``:
:class:`LoadConfig`, ``jobs_schema``: :class:`JobsConfig`), so a misspelt key, a value of the wrong type or
a choice outside a closed set (Enums) fails at composition with Hydra's message naming the key. The schemas
leave every group ``MISSING``; the YAML's defaults list fills them, except ``model``, which is chosen on the
command line (``+model=llama``: the defaults list must not already hold ``model``). A primary that adds
groups or keys of its own (``configs/jobs.yaml``) lists a subclass of :class:`SaveConfig` after ``save``.

Groups and keys (see ``configs/`` for the options):

- ``model``: Hugging Face ``LlamaConfig`` field names (``model.num_hidden_layers=2``); ``torch_dtype`` one of
  :class:`DType`.
- ``world``: ``nnodes``, ``nproc_per_node`` (checked against torchrun's environment), ``timeout_s``.
- ``placement``: ``device`` (auto|cuda|cpu), ``gpus``, ``bind_cpus``, ``check_free_memory``, ``headroom``.
- ``parallel``: ``dp_shard`` (-1: the ranks left over), ``tp`` (-1: all ranks).
- ``output``: ``dir`` (a directory, or an object-store prefix ``s3://bucket/prefix``: see
  :mod:`launcher.locations`), ``max_shard_size``, ``dtype`` (a :class:`DType` or null), ``overwrite`` (error|replace),
  ``durable``, ``thread_count``.
- ``source``: ``kind`` (random|dcp|hf), ``path`` (hf: a directory or ``s3://bucket/prefix``; dcp: a directory),
  ``key_prefix``, ``thread_count``.
- top level: ``seed`` (int, the random init), and for ``load`` ``compare`` (none|random) and ``dtype`` (a
  :class:`DType` or null).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """A required config value is missing or unusable; the message gives the override that fixes it."""


class Device(Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class Overwrite(Enum):
    error = "error"
    replace = "replace"


class AsyncMode(Enum):
    """``output.async_mode``: ``off`` saves in the foreground; ``thread`` / ``process`` run ``hf_storage.async_save``
    (``async`` itself is a Python keyword, so no typed config can have a field of that name)."""

    off = "off"
    thread = "thread"
    process = "process"


class SourceKind(Enum):
    random = "random"
    dcp = "dcp"
    hf = "hf"


class Compare(Enum):
    none = "none"  # load only
    random = "random"  # check every loaded tensor against the random init of ``seed``


class DType(Enum):
    """The dtypes a launcher checkpoint can hold; the short names are aliases (``output.dtype=bf16``)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"
    fp32 = "float32"
    bf16 = "bfloat16"
    fp16 = "float16"
    fp64 = "float64"


@dataclass
class ModelConfig:
    """A Llama architecture, with the field names of ``transformers.LlamaConfig`` (written to config.json)."""

    architectures: list[str] = field(default_factory=lambda: ["LlamaForCausalLM"])
    model_type: str = "llama"
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02  # std of the random source's init
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    torch_dtype: DType = DType.bfloat16  # dtype of the checkpoint unless output.dtype says otherwise


@dataclass
class WorldConfig:
    nnodes: int = 1
    nproc_per_node: int = 1
    timeout_s: float = 600.0  # process group timeout


@dataclass
class PlacementConfig:
    device: Device = Device.auto
    gpus: list[str] | None = None  # NVML indices or UUIDs for local ranks 0, 1, ...; None: every GPU
    bind_cpus: bool = True  # pin each rank to the CPUs NVML reports near its GPU
    check_free_memory: bool = True
    headroom: float = 1.25  # needed memory = local shard bytes x headroom


@dataclass
class ParallelConfig:
    dp_shard: int = -1  # data-parallel (FSDP) degree; -1: world size / tp
    tp: int = 1  # tensor-parallel degree; -1: world size / dp_shard


@dataclass
class OutputConfig:
    dir: str = MISSING  # a directory, or s3://bucket/prefix (kept as a string: launcher.locations)
    max_shard_size: str | None = "5GB"
    dtype: DType | None = None  # None: model.torch_dtype
    overwrite: Overwrite = Overwrite.error
    durable: bool = False  # fsync files and directory before publishing
    thread_count: int = 4
    async_mode: AsyncMode = AsyncMode.off  # thread | process: the save's stall and background time reported


@dataclass
class SourceConfig:
    kind: SourceKind = SourceKind.random
    path: str | None = None  # dcp: the checkpoint directory; hf: a directory or s3://bucket/prefix
    key_prefix: str = ""  # dcp: prefix of the model keys, e.g. "model."
    thread_count: int = 4  # reader threads per rank


@dataclass
class SaveConfig:
    """``configs/save.yaml``: every group is chosen by the defaults list, ``model`` by ``+model=NAME``."""

    model: ModelConfig = MISSING
    world: WorldConfig = MISSING
    placement: PlacementConfig = MISSING
    parallel: ParallelConfig = MISSING
    output: OutputConfig = MISSING
    source: SourceConfig = MISSING
    seed: int = 0  # the random source: same seed => byte-identical checkpoint at any world size and layout


@dataclass
class LoadConfig:
    """``configs/load.yaml``: load ``source.path`` (an HF checkpoint) into the layout, optionally compare."""

    model: ModelConfig = MISSING
    world: WorldConfig = MISSING
    placement: PlacementConfig = MISSING
    parallel: ParallelConfig = MISSING
    source: SourceConfig = MISSING
    seed: int = 0  # compare=random: the seed the checkpoint was saved with
    compare: Compare = Compare.none
    dtype: DType | None = None  # load into this dtype (cast while reading); None: the stored dtypes


@dataclass
class JobsConfig(SaveConfig):
    """``configs/jobs.yaml``: the save app's config plus the cluster to render a job for."""

    cluster: Any = MISSING  # typed by the cluster option's own schema (launcher.jobs)


TOP_SCHEMAS = {"save_schema": SaveConfig, "load_schema": LoadConfig, "jobs_schema": JobsConfig}

SCHEMAS = {
    "model": ModelConfig,
    "world": WorldConfig,
    "placement": PlacementConfig,
    "parallel": ParallelConfig,
    "output": OutputConfig,
    "source": SourceConfig,
}
SCHEMA_OPTION = "schema"


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        cs.store(group=group, name=SCHEMA_OPTION, node=node)
    for name, node in TOP_SCHEMAS.items():
        cs.store(name=name, node=node)


# ----------------------------------------------------------------------------------------------- resolvers


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def on_rank0(value: Any) -> Any:
    """``value`` on global rank 0, None elsewhere (``hydra.output_subdir``: only rank 0 writes .hydra/)."""
    return value if env_rank() == 0 else None


def log_handlers() -> list[str]:
    """Rank 0 logs to the console and the run's log file; the other ranks to the console only."""
    return ["console", "file"] if env_rank() == 0 else ["console"]


def run_id() -> str:
    """A run name every rank computes alike: torchrun's rendezvous id, or a timestamp for one process."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":
        return rid
    if "RANK" not in os.environ:  # one process: a timestamp cannot differ between ranks
        return time.strftime("%Y-%m-%d_%H-%M-%S")
    return f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("launcher.rank", env_rank, replace=True)
    OmegaConf.register_new_resolver("launcher.on_rank0", on_rank0, replace=True)
    OmegaConf.register_new_resolver("launcher.log_handlers", log_handlers, replace=True)
    OmegaConf.register_new_resolver("launcher.run_id", run_id, replace=True)


register_schemas()
register_resolvers()
