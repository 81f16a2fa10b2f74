"""The launcher apps with an object store: ``output.dir=s3://...``, ``source.path=s3://...``, ``launcher.verify``.

Against the session's moto server (``tests/conftest.py``: ``AWS_ENDPOINT_URL`` and credentials are in
``os.environ``, so torchrun and its ranks inherit them):

- ``torchrun --nproc-per-node=2 -m launcher.save output.dir=s3://BUCKET/ckpt`` writes the same bytes as a
  local save of the same seed; the run directory and log stay local; ``launcher.verify`` passes it;
- ``torchrun --nproc-per-node=1 -m launcher.load source.path=s3://BUCKET/ckpt compare=random`` equals the
  random init; ``source=hf source.path=s3://...`` re-lays it out into another prefix;
- a malformed or unsupported URI is one line naming the value and the fix, before any process group.
"""

from __future__ import annotations

import contextlib
import io
from urllib.parse import urlsplit

import pytest

from launcher.session import CONFIG_DIR, ConfigError
from tests.launcher_utils import files_of, python_cmd, run, torchrun_cmd
from tests.s3_server import s3_client
from tests.test_s3_save import unpinned

SEED = 11
TINY = ["+model=tiny", f"seed={SEED}", "output.max_shard_size=100KB"]


def compose_app(app: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(app, list(overrides))


def objects(uri: str) -> dict[str, bytes]:
    """The objects directly under the prefix of ``uri``, by name."""
    parts = urlsplit(uri)
    prefix = parts.path.strip("/") + "/"
    client = s3_client()
    listed = client.list_objects_v2(Bucket=parts.netloc, Prefix=prefix, Delimiter="/").get("Contents", [])
    return {
        o["Key"][len(prefix) :]: client.get_object(Bucket=parts.netloc, Key=o["Key"])["Body"].read() for o in listed
    }


def app_lines(text: str, app: str) -> list[str]:
    return [line for line in text.splitlines() if f"{app}: " in line and "Error: " in line]


def test_torchrun_save_to_s3_then_load_and_verify(s3_bucket, tmp_path):
    from launcher import save
    from launcher.verify import main as launcher_verify

    uri = f"{s3_bucket}/ckpt/step-1"
    out = run(torchrun_cmd("launcher.save", 2, *TINY, f"output.dir={uri}"), cwd=tmp_path)
    assert "saved 21 tensors" in out.stdout and uri in out.stdout
    stored = objects(uri)
    assert "model.safetensors.index.json" in stored and "config.json" in stored
    assert len([n for n in stored if n.endswith(".safetensors")]) > 1

    save.run(compose_app("save", *TINY, f"output.dir={tmp_path / 'local'}"))  # one rank, in this process
    assert unpinned(stored) == files_of(tmp_path / "local")  # the same bytes as a local save of the seed

    (run_dir,) = (tmp_path / "outputs" / "save").iterdir()  # Hydra's run dir and log stay local
    assert "saved 21 tensors" in (run_dir / "save.log").read_text() and (run_dir / ".hydra").is_dir()
    assert not (tmp_path / "s3:").exists()  # no local directory made from the URI

    load = ["+model=tiny", f"seed={SEED}", f"source.path={uri}", "compare=random"]
    out = run(torchrun_cmd("launcher.load", 1, *load), cwd=tmp_path)
    assert "all 21 tensors equal the random init of seed=11" in out.stdout and uri in out.stdout

    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        assert launcher_verify([f"output.dir={uri}"]) == 0
    assert uri in report.getvalue()


def test_hf_source_from_s3_to_another_prefix(s3_bucket):
    """``source=hf source.path=s3://...``: read from the store, cast, written to another prefix; loads equal."""
    from launcher import load, save

    first, second = f"{s3_bucket}/fp32", f"{s3_bucket}/bf16/"
    save.run(compose_app("save", *TINY, f"output.dir={first}"))
    summary = save.run(
        compose_app("save", *TINY, "source=hf", f"source.path={first}", f"output.dir={second}", "output.dtype=bf16")
    ).summary
    assert summary.path == f"{s3_bucket}/bf16" and summary.tensors == 21
    report = load.run(compose_app("load", "+model=tiny", f"seed={SEED}", f"source.path={second}", "compare=random"))
    assert report.tensors == 21 and not report.mismatched


MALFORMED = [  # (app, overrides, the named value and the fix)
    ("save", ["output.dir=s3://"], ["output.dir='s3://' is not a valid object-store URI", "output.dir=s3://BUCKET"]),
    ("save", ["output.dir=s3:///ckpt"], ["output.dir='s3:///ckpt' is not a valid", "s3://BUCKET/PREFIX"]),
    ("save", ["output.dir=s3://b/../ckpt"], ["output.dir='s3://b/../ckpt' is not a valid", "'..'"]),
    ("save", ["output.dir=s3:/b/ckpt"], ["output.dir='s3:/b/ckpt' has lost a slash", "output.dir=s3://BUCKET"]),
    ("save", ["output.dir=gs://b/ckpt"], ["output.dir='gs://b/ckpt': gs:// is not supported", "s3://BUCKET"]),
    ("save", ["output.dir=/x", "source=hf", "source.path=s3://"], ["source.path='s3://' is not a valid"]),
    ("save", ["output.dir=/x", "source=dcp", "source.path=s3://b/run"], ["source=dcp reads a local directory"]),
    ("load", ["source.path=s3://"], ["source.path='s3://' is not a valid object-store URI"]),
]


@pytest.mark.parametrize("app,overrides,words", MALFORMED, ids=[" ".join(m[1]) for m in MALFORMED])
def test_malformed_uri_is_named_before_any_process_group(app, overrides, words):
    from launcher import load, save

    with pytest.raises(ConfigError) as e:
        (save if app == "save" else load).run(compose_app(app, "+model=tiny", *overrides))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_malformed_uri_is_one_line_from_the_command_line(tmp_path):
    out = run(
        python_cmd("launcher.save", "+model=tiny", "output.dir=s3://"),
        cwd=tmp_path,
        check=False,
        HYDRA_FULL_ERROR="0",
        LAUNCHER_RUN_DIR=str(tmp_path / "run"),
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    (line,) = app_lines(out.stderr, "launcher.save")
    assert line.startswith("launcher.save: ConfigError: output.dir='s3://' is not a valid object-store URI")


def test_missing_prefix_and_bad_verify_uri_are_one_line(s3_bucket, capsys):
    from hf_storage import HFStorageError
    from launcher import load
    from launcher.verify import main as launcher_verify

    with pytest.raises(HFStorageError, match="nothing-here' holds no model.safetensors.index.json"):  # one line
        load.run(compose_app("load", "+model=tiny", f"source.path={s3_bucket}/nothing-here"))
    with pytest.raises(SystemExit) as e:
        launcher_verify(["source.path=s3://"])
    assert e.value.code == 1
    (line,) = app_lines(capsys.readouterr().err, "launcher.verify")
    assert "ConfigError: source.path='s3://' is not a valid object-store URI" in line
