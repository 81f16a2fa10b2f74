"""End to end, as users run it: torchrun save at 4 and 2 ranks, load at another world size, transformers reads it.

- ``torchrun --nproc-per-node=4 -m launcher.save parallel=fsdp_tp`` and the one-rank app (no torchrun)
  with the same seed write byte-identical files;
- ``launcher.load`` at 2 ranks reads the 4-rank checkpoint and compares it with the random init; the 2-rank
  tied-embedding bf16 save loads at 1 rank; a wrong seed makes ``python -m launcher.load`` exit non-zero;
- ``AutoModelForCausalLM.from_pretrained`` gives exactly the saved weights;
- one run directory for all ranks, with ``.hydra/`` and the log file from rank 0 only;
- an error the user can fix (existing output, missing source, world mismatch) is one line and exit status 1,
  the traceback only with ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from launcher.models import param_specs
from launcher.sources import random_local
from tests.launcher_utils import ROOT, files_of, python_cmd, run, torchrun_cmd

SEED = 7
TINY = ["+model=tiny", f"seed={SEED}", "output.max_shard_size=100KB"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def four_ranks(work):
    """torchrun 4 ranks, 2-D mesh (dp=2, tp=2); its stdout for the logging checks."""
    out = run(torchrun_cmd("launcher.save", 4, *TINY, "parallel=fsdp_tp", f"output.dir={work / 'ws4'}"), cwd=work)
    return work / "ws4", out.stdout + out.stderr


def compose_app(app: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    from launcher.session import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(app, list(overrides))


@pytest.fixture(scope="module")
def one_rank(work):
    """One rank in this process (no torchrun): the app makes and destroys its own one-rank group."""
    from launcher import save

    save.run(compose_app("save", *TINY, f"output.dir={work / 'ws1'}"))
    return work / "ws1"


def reference(model_overrides: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole random init of SEED, made in this process (no ranks)."""
    m = OmegaConf.create(
        dict(
            vocab_size=259,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=None,
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
        )
        | model_overrides
    )
    return {s.name: random_local(SEED, s, (0,) * len(s.shape), s.shape, 0.02, dtype, "cpu") for s in param_specs(m)}


def read_all(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_same_seed_gives_byte_identical_files_at_ws1_and_ws4(four_ranks, one_rank):
    ws4, ws1 = files_of(four_ranks[0]), files_of(one_rank)
    assert len([n for n in ws4 if n.endswith(".safetensors")]) > 1  # several files: the layout really splits
    assert ws4.keys() == ws1.keys() and all(ws4[n] == ws1[n] for n in ws4)


def test_saved_tensors_are_the_random_init(four_ranks):
    got, want = read_all(four_ranks[0]), reference({}, torch.float32)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_one_run_dir_rank0_writes_hydra_and_log(four_ranks, work):
    _, output = four_ranks
    runs = [p for p in (work / "outputs" / "save").iterdir()]
    assert len(runs) == 1, runs  # not one per rank
    assert (runs[0] / ".hydra" / "config.yaml").is_file()
    log = (runs[0] / "save.log").read_text()
    assert "[rank0]" in log and "[rank3]" not in log and "saved 21 tensors" in log
    assert "went through row assembly" in log  # tensor-parallel column shards, all 4 ranks on this node
    assert "[rank3]" in output  # the other ranks log to the console, prefixed
    assert "GB/s" in output and "peak RSS per rank: r0" in output and "r3" in output


def test_load_at_another_world_size_compares_with_the_random_init(four_ranks, work):
    out = run(
        torchrun_cmd(
            "launcher.load", 2, "+model=tiny", f"seed={SEED}", f"source.path={four_ranks[0]}", "compare=random"
        ),
        cwd=work,
    )
    assert "all 21 tensors equal the random init of seed=7" in out.stdout


def test_transformers_from_pretrained_has_identical_weights(four_ranks):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(four_ranks[0])
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.float32
    want = reference({}, torch.float32)
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_two_rank_save_loads_at_one_rank_and_in_transformers(work):
    from transformers import AutoModelForCausalLM

    from launcher import load

    out_dir, tied = work / "ws2-tied", ["model.tie_word_embeddings=true"]
    run(
        torchrun_cmd("launcher.save", 2, *TINY, *tied, "output.dtype=bfloat16", "parallel=tp", f"output.dir={out_dir}"),
        cwd=work,
    )
    report = load.run(
        compose_app("load", "+model=tiny", *tied, f"seed={SEED}", f"source.path={out_dir}", "compare=random")
    )
    assert report.tensors == 20 and not report.mismatched
    want = reference({"tie_word_embeddings": True}, torch.bfloat16)
    assert "lm_head.weight" not in read_all(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, want["model.embed_tokens.weight"])
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_load_exits_non_zero_when_the_weights_differ(four_ranks, work):
    out = run(
        python_cmd(
            "launcher.load", "+model=tiny", f"seed={SEED + 1}", f"source.path={four_ranks[0]}", "compare=random"
        ),
        cwd=work,
        check=False,
        LAUNCHER_RUN_DIR=str(work / "run-bad"),
    )
    assert out.returncode != 0
    assert "21 of 21 tensors differ from the random init of seed=8" in out.stdout + out.stderr


def test_in_process_errors_name_the_fix(four_ranks, work):
    """Without torchrun the app is one rank; errors before and inside the save name the override to use."""
    from hf_storage import CheckpointExistsError
    from launcher import save
    from launcher.dist import WorldError

    exists = compose_app("save", *TINY, f"output.dir={four_ranks[0]}", "output.overwrite=error")
    too_big = compose_app("save", *TINY, f"output.dir={work / 'never'}", "world=1x8")
    with pytest.raises(CheckpointExistsError, match="output.overwrite=replace"):
        save.run(exists)
    with pytest.raises(WorldError, match="world.nproc_per_node=1"):
        save.run(too_big)
    assert not (work / "never").exists()


def app_lines(text: str, app: str) -> list[str]:
    """The error lines the app itself printed (torchrun's agent adds its own ChildFailedError report)."""
    return [line for line in text.splitlines() if f"{app}: " in line and "Error: " in line]


FIXABLE = [  # (launcher, app, overrides, error, words of the message): {ckpt} is a saved checkpoint
    (
        "torchrun",
        "launcher.save",
        ["+model=tiny", "output.dir={ckpt}"],
        "CheckpointExistsError",
        ["already holds a checkpoint", "output.overwrite=replace"],
    ),
    (
        "python",
        "launcher.load",
        ["+model=tiny", "source.path={ckpt}-missing"],
        "ConfigError",
        ["source.path=", "-missing does not exist", "pass source.path=DIR"],
    ),
    (
        "python",
        "launcher.save",
        ["+model=tiny", "source=dcp", "source.path={ckpt}-missing", "output.dir={ckpt}-x"],
        "ConfigError",
        ["source.path=", "pass source.path=DIR of a torch.distributed.checkpoint"],
    ),
    (
        "python",
        "launcher.save",
        ["+model=tiny", "world=1x8", "output.dir={ckpt}-x"],
        "WorldError",
        ["world.nproc_per_node=8", "Fix: pass world.nnodes=1 world.nproc_per_node=1"],
    ),
    (
        "python",
        "launcher.save",
        ["+model=tiny", "model.num_attention_heads=3", "output.dir={ckpt}-x"],
        "ModelConfigError",
        ["model.hidden_size=64 is not a multiple of model.num_attention_heads=3"],
    ),
]


@pytest.mark.parametrize("launcher,app,overrides,error,words", FIXABLE, ids=[f[3] + "-" + f[0] for f in FIXABLE])
def test_fixable_errors_are_one_line_and_exit_1(one_rank, work, launcher, app, overrides, error, words):
    args = [o.format(ckpt=one_rank) for o in overrides]
    cmd = torchrun_cmd(app, 1, *args) if launcher == "torchrun" else python_cmd(app, *args)
    run_dir = work / f"run-{error}-{launcher}"
    out = run(cmd, cwd=work, check=False, HYDRA_FULL_ERROR="0", LAUNCHER_RUN_DIR=str(run_dir))
    assert out.returncode == 1, out.stderr
    lines = app_lines(out.stderr, app)
    assert len(lines) == 1, out.stderr
    prefix = "[rank0] " if launcher == "torchrun" else ""
    assert lines[0].startswith(f"{prefix}{app}: {error}: ") and all(w in lines[0] for w in words), lines[0]
    if launcher == "torchrun":  # the agent's own report of the failed rank is the only traceback
        assert out.stderr.count("Traceback") == 1 and "ChildFailedError" in out.stderr
        agent = out.stderr.split("Traceback")[1]
        assert str(ROOT / "launcher") not in agent and str(ROOT / "hf_storage") not in agent
    else:
        assert "Traceback" not in out.stdout + out.stderr
    assert error in (run_dir / f"{app.split('.')[1]}.log").read_text()  # rank 0's log file has it too
    assert not (one_rank.parent / f"{one_rank.name}-x").exists()


def test_a_wrong_type_is_hydras_short_report_naming_the_key(work):
    """Checked by the schema while Hydra composes, before the app runs: Hydra's message, no traceback."""
    out = run(
        python_cmd("launcher.save", "+model=tiny", "seed=abc", f"output.dir={work / 'never'}"),
        cwd=work,
        check=False,
        HYDRA_FULL_ERROR="0",
        LAUNCHER_RUN_DIR=str(work / "run-bad-type"),
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "seed=abc" in out.stderr and "could not be converted to Integer" in out.stderr


def test_hydra_full_error_shows_the_traceback(one_rank, work):
    out = run(
        python_cmd("launcher.save", "+model=tiny", f"output.dir={one_rank}"),
        cwd=work,
        check=False,
        HYDRA_FULL_ERROR="1",
        LAUNCHER_RUN_DIR=str(work / "run-full-error"),
    )
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr and "hf_storage.errors.CheckpointExistsError" in out.stderr
    assert not app_lines(out.stderr, "launcher.save")


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_mode_reports_the_stall_and_writes_the_same_bytes(one_rank, work, mode):
    out_dir = work / f"ws2-async-{mode}"
    out = run(
        torchrun_cmd("launcher.save", 2, *TINY, "parallel=tp", f"output.async_mode={mode}", f"output.dir={out_dir}"),
        cwd=work,
    )
    assert "async: training would have stood still" in out.stdout + out.stderr
    assert files_of(out_dir) == files_of(one_rank)
