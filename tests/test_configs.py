"""Config tests with Hydra's compose API: no processes. Every group option composes, bad values fail clearly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, OmegaConf

from launcher import config as lconfig
from launcher.config import Compare, DType, JobsConfig, LoadConfig, SaveConfig
from launcher.dist import WorldError, WorldInfo, check_world, resolve_degrees, world_from_env
from launcher.models import ModelConfigError, hf_config, param_specs, parse_dtype
from launcher.session import CONFIG_DIR, ConfigError, check_config, options_of, require

GROUPS = ["model", "world", "placement", "parallel", "output", "source"]
REQUIRED = {"save": ["output.dir=/tmp/ckpt"], "load": ["source.path=/tmp/ckpt"]}


def options(group: str) -> list[str]:
    found = options_of(group)
    assert found, f"no options in configs/{group}/"
    return found


def compose_app(app: str, *overrides: str, model: str | None = "tiny", hydra: bool = False):
    args = ([f"+model={model}"] if model else []) + list(REQUIRED[app]) + list(overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=app, overrides=args, return_hydra_config=hydra)


def error_text(e: BaseException) -> str:
    """Hydra wraps the OmegaConf error that names the key; read the whole chain."""
    parts = []
    while e is not None:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return " | ".join(parts)


def option_rounds(app: str) -> list[list[str]]:
    """Overrides that together choose every option of every group at least once, in few compositions."""
    groups = [g for g in GROUPS if not (app == "load" and g == "output")]
    table = {g: options(g) for g in groups}
    rounds = []
    for i in range(max(len(v) for v in table.values())):
        pick = {g: opts[i % len(opts)] for g, opts in table.items()}
        args = [f"+model={o}" if g == "model" else f"{g}={o}" for g, o in pick.items()]
        rounds.append(args + (["source.path=/tmp/src"] if pick["source"] != "random" else []))
    return rounds


@pytest.mark.parametrize("app", ["save", "load"])
def test_every_group_option_composes(app):
    for args in option_rounds(app):
        cfg = compose_app(app, *args, model=None)
        for group in GROUPS:
            if group in cfg:  # typed by the group's schema, nothing left missing
                OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=True)
        check_config(cfg)
    covered = {a for args in option_rounds(app) for a in args}
    assert "+model=llama" in covered and "parallel=fsdp_tp" in covered and "source=dcp" in covered


@pytest.mark.parametrize("name,billions", [("llama3_8b", 8.03), ("llama3_70b", 70.55), ("llama3_405b", 405.85)])
def test_real_model_shapes(name, billions):
    cfg = compose_app("save", model=name)
    total = sum(s.numel for s in param_specs(cfg.model))
    assert math.isclose(total / 1e9, billions, abs_tol=0.01)
    hf = hf_config(cfg.model, parse_dtype("bf16", "x"))
    assert hf["rope_scaling"]["rope_type"] == "llama3" and hf["torch_dtype"] == "bfloat16"


def test_hf_field_names_and_tied_embeddings():
    cfg = compose_app("save", "model.num_hidden_layers=1", "model.tie_word_embeddings=true")
    names = [s.name for s in param_specs(cfg.model)]
    assert "lm_head.weight" not in names and "model.layers.1.mlp.up_proj.weight" not in names
    assert hf_config(cfg.model, parse_dtype("float32", "x"))["tie_word_embeddings"] is True


def test_model_must_be_appended_not_overridden():
    with pytest.raises(HydraException) as e:
        compose_app("save", "model=llama", model=None)
    assert "+model=llama" in error_text(e.value)


def test_missing_model_names_the_fix():
    cfg = compose_app("save", model=None)
    with pytest.raises(ConfigError, match=r"\+model=NAME.*llama3_8b"):
        check_config(cfg)


def test_missing_output_dir_names_the_fix():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="save", overrides=["+model=tiny"])
    with pytest.raises(ConfigError, match="output.dir=/path/to/checkpoint"):
        require(cfg, "output.dir", "/path/to/checkpoint")


def test_removed_group_or_seed_is_named():
    with pytest.raises(ConfigError, match="no placement.*placement=auto|cpu|cuda"):
        check_config(compose_app("save", "~placement"))
    with pytest.raises(ConfigError, match="seed"):
        check_config(compose_app("save", "~seed"))


@pytest.mark.parametrize(
    "app,override,needles",
    [
        ("save", "output.overwrite=maybe", ["output.overwrite=maybe", "error, replace"]),
        ("save", "placement.device=tpu", ["auto, cuda, cpu"]),
        ("save", "model.num_hidden_layers=abc", ["num_hidden_layers"]),
        ("save", "model.hidden_sise=64", ["hidden_sise"]),
        ("save", "source=s3", ["source"]),
        ("save", "seed=abc", ["seed=abc", "'abc'", "Integer"]),
        ("save", "seed=1.5", ["seed=1.5", "Integer"]),
        ("save", "model.torch_dtype=float7", ["'float7'", "float32, bfloat16"]),
        ("save", "output.dtype=int4", ["'int4'", "bf16"]),
        ("save", "output.durable=sometimes", ["output.durable", "not a valid bool"]),
        ("save", "output.thread_count=many", ["output.thread_count", "Integer"]),
        ("save", "seeed=1", ["seeed", "SaveConfig"]),
        ("save", "compare=random", ["compare", "SaveConfig"]),  # a load key is not a save key
        ("load", "compare=yes", ["compare=yes", "none, random"]),
        ("load", "dtype=float7", ["dtype=float7", "float32, bfloat16"]),
        ("load", "seed=abc", ["seed=abc", "Integer"]),
    ],
)
def test_bad_types_and_choices_fail_at_composition_naming_the_key(app, override, needles):
    with pytest.raises(HydraException) as e:
        compose_app(app, override)
    text = error_text(e.value)
    assert all(n in text for n in needles), text


@pytest.mark.parametrize(
    "override,error,needle",
    [
        ("model.num_attention_heads=5", ModelConfigError, "num_attention_heads=5"),
        ("model.num_key_value_heads=3", ModelConfigError, "num_key_value_heads=3"),
        ("model.vocab_size=0", ModelConfigError, "vocab_size=0"),
    ],
)
def test_bad_values_fail_before_any_process_group(override, error, needle):
    with pytest.raises(error) as e:
        check_config(compose_app("save", override))
    assert needle in str(e.value)


def test_top_level_is_typed_by_the_app_schema():
    save, load = compose_app("save", "seed=3", "output.dtype=bf16"), compose_app("load", "compare=random", "dtype=fp32")
    assert OmegaConf.get_type(save) is SaveConfig and OmegaConf.get_type(load) is LoadConfig
    assert save.seed == 3 and save.output.dtype is DType.bfloat16 and save.model.torch_dtype is DType.float32
    assert load.compare is Compare.random and load.dtype is DType.float32 and load.seed == 0
    assert compose_app("load").compare is Compare.none and compose_app("load").dtype is None
    bf16 = parse_dtype(save.output.dtype, "output.dtype")
    assert bf16 is parse_dtype("bf16", "x") is parse_dtype("torch.bfloat16", "x") is torch.bfloat16
    with pytest.raises(ModelConfigError, match="float7"):
        parse_dtype("float7", "x")


def test_jobs_primary_extends_the_save_schema_without_changing_its_values():
    import launcher.jobs  # noqa: F401  (registers the cluster schemas)

    save = compose_app("save", "seed=5", "world=2x8")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        jobs = compose("jobs", ["+model=tiny", "output.dir=/tmp/ckpt", "seed=5", "world=2x8"])
    assert OmegaConf.get_type(jobs) is JobsConfig and "cluster" in jobs
    top = {k: v for k, v in OmegaConf.to_container(jobs).items() if k != "cluster"}
    assert top == OmegaConf.to_container(save)


@pytest.mark.parametrize(
    "dp,tp,world,expect", [(-1, 1, 4, (4, 1)), (-1, 2, 4, (2, 2)), (1, -1, 2, (1, 2)), (2, 2, 4, (2, 2))]
)
def test_parallel_degrees(dp, tp, world, expect):
    cfg = compose_app("save", f"parallel.dp_shard={dp}", f"parallel.tp={tp}")
    assert resolve_degrees(cfg.parallel, world, cfg.model) == expect


@pytest.mark.parametrize(
    "dp,tp,world,needle",
    [
        (3, 1, 4, "does not divide the world"),
        (-1, 4, 4, "num_key_value_heads=2"),
        (-1, -1, 4, "both -1"),
        (0, 1, 1, "must be >= 1"),
    ],
)
def test_bad_parallel_degrees(dp, tp, world, needle):
    cfg = compose_app("save", f"parallel.dp_shard={dp}", f"parallel.tp={tp}")
    with pytest.raises(WorldError, match=needle):
        resolve_degrees(cfg.parallel, world, cfg.model)


def test_world_auto_reads_torchrun_env(monkeypatch):
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    cfg = compose_app("save")
    assert (cfg.world.nnodes, cfg.world.nproc_per_node) == (2, 4)
    assert isinstance(cfg.world.nnodes, int)


def test_world_mismatch_names_both_sides_and_fix():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}
    info = world_from_env(env)
    check_world(compose_app("save", "world.nproc_per_node=2").world, info)
    with pytest.raises(WorldError) as e:
        check_world(compose_app("save", "world=1x8").world, info)
    msg = str(e.value)
    assert "world.nnodes=1 x world.nproc_per_node=8 = 8" in msg and "WORLD_SIZE=2" in msg
    assert "world.nproc_per_node=2" in msg and "--nproc-per-node=8" in msg
    assert world_from_env({}) == WorldInfo(0, 1, 0, 1, 1, False)
    with pytest.raises(WorldError, match="without torchrun"):
        check_world(compose_app("save", "world=2x8").world, world_from_env({}))


def test_run_dir_is_shared_and_only_rank0_writes(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    for rank, subdir, handlers in (("0", ".hydra", ["console", "file"]), ("3", None, ["console"])):
        monkeypatch.setenv("RANK", rank)
        hc = compose_app("save", hydra=True).hydra
        assert hc.run.dir == "outputs/app/job-42" or hc.run.dir.endswith("/job-42")
        assert hc.output_subdir == subdir
        assert OmegaConf.to_container(hc.job_logging, resolve=False)["root"]["handlers"] is not None
        assert lconfig.log_handlers() == handlers
    monkeypatch.setenv("LAUNCHER_RUN_DIR", "/shared/run")
    assert compose_app("save", hydra=True).hydra.run.dir == "/shared/run"


@dataclass
class ProbeConfig(SaveConfig):
    cluster: Any = MISSING
    job_name: str = MISSING


def test_save_config_is_composable_from_another_primary(tmp_path: Path):
    """configs/jobs.yaml style: [save, SCHEMA, cluster: x, _self_], SCHEMA a subclass of SaveConfig that names
    the primary's own groups and keys; without it the typed top level refuses them."""
    ConfigStore.instance().store(name="probe_schema", node=ProbeConfig)
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "fake.yaml").write_text("nodes_from: world\n")
    (tmp_path / "untyped.yaml").write_text("defaults:\n  - save\n  - cluster: fake\n  - _self_\njob_name: x\n")
    (tmp_path / "probe.yaml").write_text(
        "defaults:\n  - save\n  - probe_schema\n  - cluster: fake\n  - _self_\njob_name: x\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"), pytest.raises(HydraException) as e:
        compose(config_name="untyped", overrides=[f"hydra.searchpath=[file://{CONFIG_DIR}]", "+model=tiny"])
    assert "cluster" in error_text(e.value)
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose(
            config_name="probe",
            overrides=[f"hydra.searchpath=[file://{CONFIG_DIR}]", "+model=tiny", "world=2x8", "output.dir=/ckpt/x"],
        )
    assert cfg.cluster.nodes_from == "world" and cfg.job_name == "x"
    assert (cfg.world.nnodes, cfg.world.nproc_per_node, cfg.output.dir) == (2, 8, "/ckpt/x")
    check_config(cfg)
