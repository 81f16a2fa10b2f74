"""launcher.jobs: the rendered Slurm / Kubernetes / local jobs run exactly the torchrun the config implies.

The scripts are not only parsed (``bash -n``) but run, with stand-ins for ``scontrol``, ``srun`` and
``torchrun`` on PATH that record the argv they receive, so the quoting is checked by bash itself.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hydra.errors import HydraException

from launcher import jobs

ROOT = Path(__file__).resolve().parent.parent
MODEL = "llama3_70b"
# a Hydra-quoted value with a space, both quote kinds and a dollar: it must reach launcher.save byte for byte
TRICKY = 'output.dir="/ckpt/run 1/it\'s $HOME"'
BASE = ["world.nnodes=4", "world.nproc_per_node=8", f"+model={MODEL}", TRICKY]
SAVE_ARGS = ["-m", "launcher.save", *BASE]


def render(*overrides: str) -> str:
    return jobs.render(list(overrides))


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """``scontrol``, ``srun`` and ``torchrun`` that write their argv (NUL-separated) into $FAKE_LOG."""
    b = tmp_path / "bin"
    b.mkdir()
    scripts = {
        "scontrol": 'printf "node-a\\nnode-b\\nnode-c\\nnode-d\\n"',
        "srun": 'printf "%s\\0" "$@" > "$FAKE_LOG/srun"\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"',
        "torchrun": 'printf "%s\\0" "$@" > "$FAKE_LOG/torchrun"\nenv > "$FAKE_LOG/env"',
    }
    for name, body in scripts.items():
        (b / name).write_text("#!/bin/bash\n" + body + "\n")
        (b / name).chmod(0o755)
    return b


def run_script(path: Path, fake_bin: Path, log: Path, **env: str) -> dict[str, list[str]]:
    log.mkdir(exist_ok=True)
    full = {"PATH": f"{fake_bin}:/usr/bin:/bin", "FAKE_LOG": str(log), "HOME": "/nonexistent", **env}
    subprocess.run(["bash", str(path)], env=full, check=True, capture_output=True, text=True)
    return {f.name: f.read_text().split("\0")[:-1] for f in log.iterdir() if f.name != "env"}


def sbatch_options(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


# ---------------------------------------------------------------------------------------------------- slurm


def test_slurm_script_is_valid_bash_and_runs_one_torchrun_per_node(tmp_path, fake_bin):
    text = render(
        "cluster=slurm",
        *BASE,
        "cluster.partition=gpu",
        "cluster.account=proj",
        "cluster.time=02:00:00",
        "cluster.job_name=save70b",
        "+cluster.env.NCCL_DEBUG=WARN",
    )
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert text.startswith("#!/bin/bash\n")
    assert sbatch_options(text) == [
        "--job-name=save70b",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--time=02:00:00",
        "--partition=gpu",
        "--account=proj",
        "--output=%x-%j.out",
    ]
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text

    argv = run_script(
        script, fake_bin, tmp_path / "log", SLURM_NNODES="4", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-d]"
    )
    assert argv["srun"][:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert argv["torchrun"] == [
        "--nnodes=4",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node-a:29500",
        "--rdzv-id=4242",
        *SAVE_ARGS,
    ]
    assert "NCCL_DEBUG=WARN" in (tmp_path / "log" / "env").read_text().splitlines()


def test_slurm_cpu_nodes_and_custom_launcher(tmp_path, fake_bin):
    text = render(
        "cluster=slurm",
        *BASE,
        "cluster.gpus_per_node=0",
        "cluster.cpus_per_task=32",
        "cluster.rdzv_port=29601",
        "cluster.module=launcher.save",
        "cluster.setup=[echo setting up]",
    )
    opts = sbatch_options(text)
    assert not any(o.startswith("--gpus-per-node") for o in opts) and "--cpus-per-task=32" in opts
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    argv = run_script(
        script, fake_bin, tmp_path / "log", SLURM_NNODES="4", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node-[a-d]"
    )
    assert "--cpus-per-task=32" in argv["srun"]  # srun does not inherit it from sbatch
    assert argv["torchrun"][3] == "--rdzv-endpoint=node-a:29601"


@pytest.mark.slow
def test_slurm_script_runs_launcher_save_on_two_nodes(tmp_path):
    """The real thing minus Slurm: ``srun`` starts the script's torchrun once per "node" on this host; the two
    agents meet in the c10d rendezvous on the first host and ``launcher.save`` writes one checkpoint."""
    from tests.dist_utils import free_port

    out = tmp_path / "ckpt"
    script = tmp_path / "job.sbatch"
    script.write_text(
        render(
            "cluster=slurm",
            "world.nnodes=2",
            "world.nproc_per_node=1",
            "+model=tiny",
            f"output.dir={out}",
            f"cluster.rdzv_port={free_port()}",
            "cluster.gpus_per_node=0",
        )
    )
    b = tmp_path / "bin"
    b.mkdir()
    stubs = {
        "scontrol": 'printf "127.0.0.1\\n127.0.0.2\\n"',
        "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
        'for i in $(seq "$SLURM_NNODES"); do "$@" > "node$i.log" 2>&1 & done\n'
        'rc=0; for p in $(jobs -p); do wait "$p" || rc=$?; done; exit $rc',
        "torchrun": f'exec {shlex.quote(sys.executable)} -m torch.distributed.run "$@"',
    }
    for name, body in stubs.items():
        (b / name).write_text("#!/bin/bash\n" + body + "\n")
        (b / name).chmod(0o755)
    env = {
        "PATH": f"{b}:/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp_path),
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node-[1-2]",
    }
    done = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in (1, 2) if (tmp_path / f"node{i}.log").exists())
    assert done.returncode == 0, f"{done.stdout}{done.stderr}{logs}"
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ kubernetes


def test_k8s_manifest_is_an_elastic_pytorchjob():
    text = render(
        "cluster=k8s",
        *BASE[:3],
        "output.dir=/ckpt/llama3-70b",
        "cluster.image=reg/hf:1",
        "cluster.claim=ckpt-pvc",
        "cluster.namespace=ml",
        "+cluster.env.NCCL_DEBUG=WARN",
    )
    job = yaml.safe_load(text)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"] == {"name": "hf-save", "namespace": "ml"}
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"  # a string in the v1 API
    assert spec["elasticPolicy"] | {"maxRestarts": 0} == {
        "rdzvBackend": "c10d",
        "rdzvPort": 29500,
        "minReplicas": 4,
        "maxReplicas": 4,
        "maxRestarts": 0,
    }
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"]
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4
    pod = worker["template"]["spec"]
    (c,) = pod["containers"]
    assert (c["name"], c["image"]) == ("pytorch", "reg/hf:1")
    assert c["command"] == [
        "torchrun",
        "--nnodes=4",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=hf-save-worker-0:29500",
        "--rdzv-id=hf-save",
        "-m",
        "launcher.save",
        *BASE[:3],
        "output.dir=/ckpt/llama3-70b",
    ]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500}]
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in c["env"]
    assert {"name": "checkpoints", "mountPath": "/ckpt"} in c["volumeMounts"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt-pvc"}} in pod["volumes"]


def test_k8s_escapes_dollar_for_kubernetes_expansion():
    job = yaml.safe_load(
        render(
            "cluster=k8s",
            *BASE[:3],
            'output.dir="/ckpt/$(whoami)"',
            "cluster.image=i",
            "cluster.gpus_per_node=0",
            "cluster.shm_size=null",
        )
    )
    c = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["command"][-1] == 'output.dir="/ckpt/$$(whoami)"'  # Kubernetes turns $$ back into $
    assert "resources" not in c and "volumeMounts" not in c


S3_OUT = "output.dir=s3://ckpt-bucket/llama3-70b/step-1000"


def k8s_pod(*overrides: str) -> dict:
    return yaml.safe_load(render("cluster=k8s", *BASE[:3], "cluster.image=reg/hf:1", *overrides))["spec"][
        "pytorchReplicaSpecs"
    ]["Worker"]["template"]["spec"]


def test_k8s_s3_storage_passes_the_aws_env_and_mounts_no_checkpoint_volume():
    pod = k8s_pod(
        S3_OUT,
        "cluster.storage=s3",
        "cluster.s3.endpoint_url=https://minio.example.com:9000",
        "cluster.s3.region=eu-west-1",
        "cluster.s3.secret=aws-credentials",
        "cluster.service_account=ckpt-writer",
        "+cluster.env.NCCL_DEBUG=WARN",
    )
    (c,) = pod["containers"]
    assert c["command"][-4:] == [*BASE[:3], S3_OUT]  # the URI reaches launcher.save as given; no cluster.* override
    assert c["env"] == [
        {"name": "AWS_ENDPOINT_URL", "value": "https://minio.example.com:9000"},
        {"name": "AWS_REGION", "value": "eu-west-1"},
        {"name": "NCCL_DEBUG", "value": "WARN"},
    ]
    assert c["envFrom"] == [{"secretRef": {"name": "aws-credentials"}}]
    assert pod["serviceAccountName"] == "ckpt-writer"
    assert c["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]  # no checkpoint PVC
    assert [v["name"] for v in pod["volumes"]] == ["dshm"]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])


def test_k8s_s3_with_a_pod_role_only_renders_no_credentials():
    """IRSA / EKS Pod Identity: the role of the service account gives the credentials; nothing else is added."""
    pod = k8s_pod(S3_OUT, "cluster.storage=s3", "cluster.service_account=ckpt-writer", "cluster.shm_size=null")
    (c,) = pod["containers"]
    assert pod["serviceAccountName"] == "ckpt-writer"
    assert "env" not in c and "envFrom" not in c and "volumeMounts" not in c and "volumes" not in pod
    assert c["command"][-1] == S3_OUT


def test_s3_output_passes_through_slurm_unchanged(tmp_path, fake_bin):
    script = tmp_path / "job.sbatch"
    script.write_text(render("cluster=slurm", *BASE[:3], S3_OUT))
    argv = run_script(
        script, fake_bin, tmp_path / "log", SLURM_NNODES="4", SLURM_JOB_ID="9", SLURM_JOB_NODELIST="node-[a-d]"
    )
    assert argv["torchrun"][-1] == S3_OUT


K8S = ["cluster=k8s", "cluster.image=i"]
S3_BAD = [
    ([*K8S, "cluster.storage=s3"], "cluster.storage=s3 writes to an object store, but output.dir='/x'"),
    ([*K8S, "output.dir=s3://b/x"], "output.dir='s3://b/x' is an object-store URI, but cluster.storage=pvc"),
    ([*K8S, "cluster.storage=s3", "output.dir=s3://b/x", "cluster.claim=c"], "cluster.claim='c' is a checkpoint vol"),
    ([*K8S, "cluster.storage=s3", "output.dir=s3://b/x", "cluster.s3.secret=AWS_keys"], "cluster.s3.secret='AWS_k"),
    ([*K8S, "cluster.storage=s3", "output.dir=s3://b/x", "cluster.s3.endpoint_url=minio:9000"], "not an http(s) URL"),
    ([*K8S, "cluster.service_account=Writer"], "cluster.service_account='Writer' is not a Kubernetes object name"),
    (["output.dir=s3://"], "output.dir='s3://' is not a valid object-store URI: pass output.dir=s3://BUCKET/PREFIX"),
    ([*K8S, "cluster.storage=s3", "output.dir=s3:/b/x"], "output.dir='s3:/b/x' has lost a slash"),
    (["source=hf", "source.path=gs://b/x"], "source.path='gs://b/x': gs:// is not supported"),
]


@pytest.mark.parametrize("overrides, message", S3_BAD)
def test_bad_object_store_values_are_named(overrides, message):
    with pytest.raises(jobs.JobConfigError) as e:
        jobs.render(["world.nnodes=2", f"+model={MODEL}", "output.dir=/x", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_storage_is_named_at_composition():
    with pytest.raises(HydraException, match="cluster.storage"):
        jobs.render(["world.nnodes=2", f"+model={MODEL}", "output.dir=/x", *K8S, "cluster.storage=gcs"])


# ----------------------------------------------------------------------------------------------------- local


def test_local_script_runs_standalone_torchrun(tmp_path, fake_bin):
    script = tmp_path / "run.sh"
    script.write_text(render("cluster=local", "world.nproc_per_node=2", f"+model={MODEL}", TRICKY))
    argv = run_script(script, fake_bin, tmp_path / "log")
    assert argv["torchrun"] == [
        "--nnodes=1",
        "--nproc-per-node=2",
        "--standalone",
        "-m",
        "launcher.save",
        "world.nproc_per_node=2",
        f"+model={MODEL}",
        TRICKY,
    ]


# ------------------------------------------------------------------------------------------ overrides, errors


def test_passthrough_drops_only_cluster_overrides():
    given = [
        "cluster=slurm",
        "cluster.partition=gpu",
        "+cluster.env.A=1",
        "~cluster.account",
        "world.nnodes=2",
        "+model=llama",
        "output.dir=/a b",
        "hydra.job.name=x",
        "clusterfoo=1",
    ]
    assert jobs.passthrough(given) == [
        "world.nnodes=2",
        "+model=llama",
        "output.dir=/a b",
        "hydra.job.name=x",
        "clusterfoo=1",
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["world.nnodes=0"], "world.nnodes=0 is invalid"),
        (["world.nproc_per_node=-2"], "world.nproc_per_node=-2 is invalid"),
        (["cluster=pbs"], "unknown cluster 'pbs': choose cluster=k8s | cluster=local | cluster=slurm"),
        (["cluster=local", "world.nnodes=2"], "cluster=local runs on this machine only, but world.nnodes=2"),
        (["cluster=k8s"], "required and not set (the job would fail on them): cluster.image"),
        (["cluster=k8s", "cluster.image=i", "cluster.job_name=Save_70B"], "cluster.job_name='Save_70B' is not a valid"),
        (["cluster=k8s", "cluster.image=i", "cluster.claim=c"], "is not on the shared volume mounted at"),
        (["cluster.partition=a b"], "cluster.partition='a b' must be one word"),
        (["cluster.rdzv_port=70000"], "cluster.rdzv_port=70000 is not a TCP port"),
        (["output.dir=/x\nrm -rf /"], "holds a line break"),
    ],
)
def test_bad_values_are_named(overrides, message):
    base = ["world.nnodes=2", f"+model={MODEL}", "output.dir=/x"]
    with pytest.raises(jobs.JobConfigError) as e:
        jobs.render(base + overrides)
    assert message in str(e.value)


def test_no_model_is_named():
    with pytest.raises(jobs.JobConfigError, match=r"no model chosen: pass \+model=NAME"):
        jobs.render(["output.dir=/x"])


def test_main_prints_or_writes_and_reports_errors(tmp_path, capsys):
    assert jobs.main(["cluster=slurm", *BASE]) == 0
    printed = capsys.readouterr().out
    assert printed == render("cluster=slurm", *BASE)
    out = tmp_path / "job.sbatch"
    assert jobs.main(["--output", str(out), "cluster=slurm", *BASE]) == 0
    assert out.read_text() == printed and os.access(out, os.X_OK)
    assert f"sbatch {shlex.quote(str(out))}" in capsys.readouterr().err
    assert jobs.main(["cluster=slurm", *BASE, "world.nnodes=0"]) == 2
    assert "launcher.jobs: error: world.nnodes=0 is invalid" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- examples

EXAMPLES = ["examples/slurm_save.sbatch", "examples/k8s_pytorchjob.yaml", "examples/k8s_pytorchjob_s3.yaml"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_committed_examples_equal_the_renderer_output(name):
    """Each example names the command that rendered it in its header; rendering it again gives the file."""
    text = (ROOT / name).read_text()
    head = next(line for line in text.splitlines() if line.startswith("# Rendered by: "))
    args = shlex.split(head.removeprefix("# Rendered by: python -m launcher.jobs "))
    fix = textwrap.dedent(f"""
        {name} drifted from the renderer; regenerate it with
        python -m launcher.jobs {shlex.join(args)} --output {name}""")
    assert jobs.render(args) == text, fix
