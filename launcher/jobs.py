"""Render a cluster job that runs ``launcher.save``, from the same Hydra config the save app composes.

    python -m launcher.jobs cluster=slurm world.nnodes=4 world.nproc_per_node=8 +model=llama3_70b output.dir=/ckpt/x
    python -m launcher.jobs cluster=k8s world.nnodes=4 world.nproc_per_node=8 +model=llama3_70b \\
        output.dir=/ckpt/x cluster.image=registry.example.com/hf-ckpt:latest cluster.claim=ckpt --output job.yaml
    python -m launcher.jobs cluster=k8s world.nnodes=4 world.nproc_per_node=8 +model=llama3_70b \\
        output.dir=s3://my-bucket/llama3-70b cluster.image=registry.example.com/hf-ckpt:latest \\
        cluster.storage=s3 cluster.s3.secret=aws-credentials cluster.s3.region=us-east-1 --output job.yaml

The primary config ``configs/jobs.yaml`` is ``configs/save.yaml`` plus the ``cluster/`` group, so every
override the save app accepts is accepted (and checked) here. The rendered job runs one torchrun agent per
node with a c10d rendezvous and passes the overrides through to ``-m launcher.save``, minus the
``cluster`` ones; ``world.nnodes`` / ``world.nproc_per_node`` size both the job and torchrun.

- ``cluster=slurm``: an sbatch script; ``srun`` starts one torchrun per node, rendezvous on the first host
  of the allocation, ``--rdzv-id=$SLURM_JOB_ID``.  Submit with ``sbatch FILE``.
- ``cluster=k8s``: a Kubeflow training-operator ``PyTorchJob`` (elastic policy, c10d, one Worker pod per
  node, rendezvous on ``<job_name>-worker-0``).  Submit with ``kubectl apply -f FILE``. Where the pods write
  the checkpoint is ``cluster.storage``: ``pvc`` (default) a ReadWriteMany claim (``cluster.claim``) mounted at
  ``cluster.mount_path`` in every pod; ``s3`` an object store, ``output.dir=s3://BUCKET/PREFIX``, with no
  checkpoint volume: the pods get ``AWS_ENDPOINT_URL`` / ``AWS_REGION`` from ``cluster.s3.endpoint_url`` /
  ``cluster.s3.region`` when set, the credentials from the Secret ``cluster.s3.secret`` (``envFrom``; keys
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` ...) or from the role of ``cluster.service_account`` (IRSA,
  EKS Pod Identity), never from the config itself.
- ``cluster=local``: a bash script running one standalone torchrun on this machine (``world.nnodes=1``).

The job is printed to stdout, or written to ``--output FILE``. Your own cluster presets go in
``configs/cluster/NAME.yaml`` with ``defaults: [slurm_schema, _self_]`` (or ``k8s_schema`` /
``local_schema``) and the keys of the matching dataclass below.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import config as _save_config  # noqa: F401  (registers the save app's schemas and resolvers)
from . import locations
from .config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRIMARY = "jobs"
K8S_PORT_NAME = "pytorchjob-port"  # the port name the training operator reads the rendezvous port from


class JobConfigError(ValueError):
    """The composed config cannot make a runnable job; the message names the key and the fix."""


# ----------------------------------------------------------------------------------------------- schemas


@dataclass
class ClusterBase:
    job_name: str = "hf-save"
    module: str = "launcher.save"  # what torchrun runs with -m
    torchrun: str = "torchrun"  # the launcher command, split like a shell would
    rdzv_port: int = 29500
    env: dict[str, str] = field(default_factory=dict)  # exported to every rank


@dataclass
class SlurmCluster(ClusterBase):
    partition: str | None = None
    account: str | None = None
    time: str = "01:00:00"
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    workdir: str | None = None  # sbatch --chdir
    log: str = "%x-%j.out"  # sbatch --output
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH options, e.g. ["--qos=high"]
    setup: list[str] = field(default_factory=list)  # shell lines run before srun, verbatim


class K8sStorage(Enum):
    """Where the pods of a k8s job write ``output.dir``."""

    pvc = "pvc"  # a shared ReadWriteMany volume: cluster.claim, mounted at cluster.mount_path
    s3 = "s3"  # an object store: output.dir=s3://BUCKET/PREFIX, no checkpoint volume


@dataclass
class K8sS3:
    """``cluster.s3``: what the pods need to reach the object store (``cluster.storage=s3``)."""

    endpoint_url: str | None = None  # AWS_ENDPOINT_URL in the pods (MinIO, Ceph, R2 ...); null: AWS's own
    region: str | None = None  # AWS_REGION in the pods
    secret: str | None = None  # a Secret whose keys (AWS_ACCESS_KEY_ID, ...) become the pods' env (envFrom)


@dataclass
class K8sCluster(ClusterBase):
    image: str = MISSING
    namespace: str | None = None
    image_pull_policy: str = "IfNotPresent"
    gpus_per_node: int = 0
    cpu: str | None = None  # requests = limits, e.g. "32"
    memory: str | None = None  # e.g. "512Gi"
    shm_size: str | None = "16Gi"  # /dev/shm as a memory emptyDir; null: none
    storage: K8sStorage = K8sStorage.pvc  # pvc: output.dir on the claim | s3: output.dir=s3://BUCKET/PREFIX
    claim: str | None = None  # a ReadWriteMany PersistentVolumeClaim shared by all pods, holding output.dir
    mount_path: str = "/ckpt"  # where the claim is mounted
    s3: K8sS3 = field(default_factory=K8sS3)
    service_account: str | None = None  # the pods' serviceAccountName (IRSA / EKS Pod Identity for s3)
    restart_policy: str = "Never"
    max_restarts: int = 0  # torchrun restarts of the worker group (elasticPolicy.maxRestarts)
    node_selector: dict[str, str] = field(default_factory=dict)


@dataclass
class LocalCluster(ClusterBase):
    setup: list[str] = field(default_factory=list)


SCHEMAS = {"slurm_schema": SlurmCluster, "k8s_schema": K8sCluster, "local_schema": LocalCluster}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(group="cluster", name=name, node=node)


register_schemas()

# --------------------------------------------------------------------------------------- config handling


def cluster_options(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir) / "cluster").glob("*.yaml"))


def _is_cluster_override(o) -> bool:
    in_cluster = [o.key_or_group, o.package or ""]
    return any(k == "cluster" or k.startswith("cluster.") for k in in_cluster)


def parse_overrides(overrides: Sequence[str]) -> list:
    bad = [o for o in overrides if any(ch in o for ch in "\n\r\0")]
    if bad:
        raise JobConfigError(f"override {bad[0]!r} holds a line break or NUL; job scripts take one-line overrides")
    return OverridesParser.create().parse_overrides(list(overrides))


def passthrough(overrides: Sequence[str]) -> list[str]:
    """The overrides for ``launcher.save``: all of the user's, except those about the cluster."""
    return [o.input_line for o in parse_overrides(overrides) if not _is_cluster_override(o)]


def _check_cluster_choice(overrides: Sequence[str], config_dir: Path) -> None:
    options = cluster_options(config_dir)
    for o in parse_overrides(overrides):
        if o.key_or_group == "cluster" and not o.is_delete():
            value = o.value()
            if value not in options:
                raise JobConfigError(
                    f"unknown cluster {value!r}: choose cluster="
                    + " | cluster=".join(options)
                    + f" (or add {Path(config_dir) / 'cluster' / f'{value}.yaml'})"
                )


def compose_job(overrides: Sequence[str], config_dir: str | os.PathLike = CONFIG_DIR) -> DictConfig:
    """Compose ``jobs.yaml`` with the overrides, as ``launcher.save`` would compose ``save.yaml``."""
    config_dir = Path(config_dir).resolve()
    _check_cluster_choice(overrides, config_dir)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="jobs"):
        return compose(PRIMARY, overrides=list(overrides))


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise JobConfigError(
            f"{key}={value!r} is invalid: it must be an integer >= {minimum}; pass {key}=N on the command line"
        )
    return value


def _check_complete(cfg: DictConfig, config_dir: Path) -> None:
    """Fail here, not in the queue: a model chosen, no ``???`` left, every interpolation resolves."""
    if "model" not in cfg:
        models = sorted(p.stem for p in (config_dir / "model").glob("*.yaml"))
        raise JobConfigError("no model chosen: pass +model=NAME (" + ", ".join(models) + ")")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise JobConfigError(
            "these values are required and not set (the job would fail on them): "
            + ", ".join(missing)
            + "; pass them as KEY=VALUE overrides"
        )
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise JobConfigError(f"the config does not resolve: {e}") from None


def _check_locations(cfg: DictConfig) -> None:
    """An ``s3://`` value of ``output.dir`` / ``source.path`` is well formed: fail here, not in the queue."""
    for key in ("output.dir", "source.path"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and locations.looks_like_uri(value):
            try:
                locations.check_uri(key, value)
            except ConfigError as e:
                raise JobConfigError(str(e)) from None


@dataclass(frozen=True)
class Job:
    """What every renderer needs: the composed config and the sizes and overrides it implies."""

    cfg: DictConfig
    cluster: DictConfig
    nnodes: int
    nproc_per_node: int
    overrides: list[str]  # passed to the module
    argv: list[str]  # the launcher.jobs command line, for the header comment


def _no_space(job: Job, *keys: str) -> None:
    for key in keys:
        value = job.cluster.get(key)
        if value is not None and (str(value) == "" or re.search(r"\s", str(value))):
            raise JobConfigError(f"cluster.{key}={value!r} must be one word without spaces; fix cluster.{key}=...")


def _check_env(env) -> dict[str, str]:
    bad = [k for k in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k))]
    if bad:
        raise JobConfigError(f"cluster.env key {bad[0]!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
    return {str(k): str(v) for k, v in env.items()}


def header(job: Job) -> str:
    return "# Rendered by: python -m launcher.jobs " + shlex.join(job.argv) + "\n"


# ----------------------------------------------------------------------------------------------- shell


class Raw(str):
    """A shell word written as is (it expands a variable); other words are quoted."""


def _shell_command(lines: Sequence[Sequence[str]]) -> str:
    """One command over several lines (a group of words a line), every word quoted unless :class:`Raw`."""
    text = [" ".join(w if isinstance(w, Raw) else shlex.quote(w) for w in words) for words in lines]
    return " \\\n  ".join(text)


def torchrun_lines(job: Job, nnodes: str, rendezvous: Sequence[str]) -> list[list[str]]:
    """The torchrun command, grouped a line per option, then ``-m MODULE`` and one override a line."""
    c = job.cluster
    return [
        shlex.split(c.torchrun),
        [nnodes],
        [f"--nproc-per-node={job.nproc_per_node}"],
        *([w] for w in rendezvous),
        ["-m", c.module],
        *([o] for o in job.overrides),
    ]


def _script_env(job: Job) -> list[str]:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in _check_env(job.cluster.env).items()]
    return list(job.cluster.get("setup", [])) + lines


def slurm_torchrun(job: Job) -> list[list[str]]:
    return torchrun_lines(
        job,
        Raw('--nnodes="$SLURM_NNODES"'),
        [
            "--rdzv-backend=c10d",
            Raw(f'--rdzv-endpoint="$head_node:{job.cluster.rdzv_port}"'),
            Raw('--rdzv-id="$SLURM_JOB_ID"'),
        ],
    )


def render_slurm(job: Job) -> str:
    c = job.cluster
    _no_space(job, "job_name", "partition", "account", "time", "mem", "workdir", "log")
    if any(re.search(r"[\r\n]", o) for o in c.sbatch):
        raise JobConfigError(f"cluster.sbatch={list(c.sbatch)!r}: an #SBATCH option cannot span lines")
    opts = [f"--job-name={c.job_name}", f"--nodes={job.nnodes}", "--ntasks-per-node=1"]
    opts += [f"--gpus-per-node={c.gpus_per_node}"] if c.gpus_per_node else []
    opts += [f"--cpus-per-task={c.cpus_per_task}"] if c.cpus_per_task else []
    opts += [f"--mem={c.mem}"] if c.mem is not None else []
    opts += [f"--time={c.time}"]
    opts += [f"--{k}={c[k]}" for k in ("partition", "account") if c[k] is not None]
    opts += [f"--chdir={c.workdir}"] if c.workdir else []
    opts += [f"--output={c.log}", *c.sbatch]
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    srun += [f"--cpus-per-task={c.cpus_per_task}"] if c.cpus_per_task else []  # srun does not inherit it
    lines = ["#!/bin/bash", header(job).rstrip("\n"), *(f"#SBATCH {o}" for o in opts), "set -eu", ""]
    lines += _script_env(job)
    lines += [
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f'echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x {job.nproc_per_node} ranks, '
        f'rendezvous on $head_node:{c.rdzv_port}"',
        "",
        _shell_command([srun, *slurm_torchrun(job)]),
        "",
    ]
    return "\n".join(lines)


def _prefixed(words: list[str], lines: list[list[str]]) -> list[list[str]]:
    return [words + lines[0], *lines[1:]]


def local_torchrun(job: Job) -> list[list[str]]:
    return torchrun_lines(job, "--nnodes=1", ["--standalone"])


def render_local(job: Job) -> str:
    if job.nnodes != 1:
        raise JobConfigError(
            f"cluster=local runs on this machine only, but world.nnodes={job.nnodes}; "
            "pass world.nnodes=1, or render cluster=slurm / cluster=k8s"
        )
    lines = [
        "#!/bin/bash",
        header(job).rstrip("\n"),
        "set -eu",
        *_script_env(job),
        _shell_command(_prefixed(["exec"], local_torchrun(job))),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- kubernetes


def _k8s_escape(s: str) -> str:
    """Kubernetes expands $(VAR) in command and env values; $$ stands for a literal $."""
    return s.replace("$", "$$")


def k8s_torchrun(job: Job) -> list[str]:
    c = job.cluster
    lines = torchrun_lines(
        job,
        f"--nnodes={job.nnodes}",
        ["--rdzv-backend=c10d", f"--rdzv-endpoint={c.job_name}-worker-0:{c.rdzv_port}", f"--rdzv-id={c.job_name}"],
    )
    return [w for words in lines for w in words]


def _k8s_checks(job: Job) -> None:
    c = job.cluster
    # the operator names the pods' services <job_name>-worker-<i>: a DNS label of at most 63 characters
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,45}[a-z0-9])?", c.job_name):
        raise JobConfigError(
            f"cluster.job_name={c.job_name!r} is not a valid PyTorchJob name: use at most 47 "
            "lowercase letters, digits and '-', starting and ending with a letter or digit"
        )
    _k8s_storage_checks(job)
    out = OmegaConf.select(job.cfg, "output.dir")
    if c.claim and out is not None and not _under(str(out), c.mount_path):
        raise JobConfigError(
            f"output.dir={out!r} is not on the shared volume mounted at "
            f"cluster.mount_path={c.mount_path!r}: every pod writes into output.dir, so put it "
            f"there (output.dir={c.mount_path}/NAME) or change cluster.mount_path"
        )


def _k8s_name(value: str | None, key: str) -> None:
    """A Secret / ServiceAccount name: a DNS subdomain (lowercase letters, digits, '-' and '.')."""
    if value is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", str(value)):
        raise JobConfigError(
            f"{key}={value!r} is not a Kubernetes object name: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )


def _k8s_storage_checks(job: Job) -> None:
    """``cluster.storage`` and ``output.dir`` agree: a claim for a directory, an object store for a URI."""
    c = job.cluster
    out = OmegaConf.select(job.cfg, "output.dir")
    uri = isinstance(out, str) and locations.looks_like_uri(out)
    if c.storage is K8sStorage.pvc and uri:
        raise JobConfigError(
            f"output.dir={out!r} is an object-store URI, but cluster.storage=pvc: pass cluster.storage=s3 "
            "(credentials from cluster.s3.secret=NAME or cluster.service_account=NAME)"
        )
    if c.storage is K8sStorage.s3:
        if not uri:
            raise JobConfigError(
                f"cluster.storage=s3 writes to an object store, but output.dir={out!r}: pass "
                f"output.dir={locations.URI_FORM}, or cluster.storage=pvc with cluster.claim=NAME"
            )
        if c.claim:
            raise JobConfigError(
                f"cluster.claim={c.claim!r} is a checkpoint volume, but cluster.storage=s3 writes output.dir to "
                "the object store: drop it (cluster.claim=null) or use cluster.storage=pvc"
            )
        url = c.s3.endpoint_url
        if url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", str(url)):
            raise JobConfigError(
                f"cluster.s3.endpoint_url={url!r} is not an http(s) URL: pass e.g. "
                "cluster.s3.endpoint_url=https://minio.example.com:9000, or null for AWS"
            )
        if c.s3.region is not None and not re.fullmatch(r"[a-z0-9-]+", str(c.s3.region)):
            raise JobConfigError(f"cluster.s3.region={c.s3.region!r} is not a region name such as us-east-1")
        _k8s_name(c.s3.secret, "cluster.s3.secret")
    _k8s_name(c.service_account, "cluster.service_account")


def _under(path: str, root: str) -> bool:
    p, r = os.path.normpath(path), os.path.normpath(root)
    return p == r or p.startswith(r.rstrip("/") + "/")


def _k8s_env(c: DictConfig) -> dict[str, str]:
    """``cluster.env``, after the object store's endpoint and region (``cluster.storage=s3``, when set)."""
    aws = {}
    if c.storage is K8sStorage.s3:
        aws = {"AWS_ENDPOINT_URL": c.s3.endpoint_url, "AWS_REGION": c.s3.region}
    return {k: str(v) for k, v in aws.items() if v is not None} | _check_env(c.env)


def _k8s_container(job: Job) -> dict:
    c = job.cluster
    container: dict = {
        "name": "pytorch",
        "image": c.image,
        "imagePullPolicy": c.image_pull_policy,
        "command": [_k8s_escape(w) for w in k8s_torchrun(job)],
    }
    env = _k8s_env(c)
    if env:
        container["env"] = [{"name": k, "value": _k8s_escape(v)} for k, v in env.items()]
    if c.storage is K8sStorage.s3 and c.s3.secret:
        container["envFrom"] = [{"secretRef": {"name": c.s3.secret}}]
    container["ports"] = [{"name": K8S_PORT_NAME, "containerPort": c.rdzv_port}]
    resources = {"nvidia.com/gpu": c.gpus_per_node} if c.gpus_per_node else {}
    resources.update({k: str(c[k]) for k in ("cpu", "memory") if c[k] is not None})
    if resources:
        container["resources"] = {"limits": resources, "requests": dict(resources)}
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}] if c.shm_size else []
    mounts += [{"name": "checkpoints", "mountPath": c.mount_path}] if c.claim else []
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _k8s_pod(job: Job) -> dict:
    c = job.cluster
    pod: dict = {"serviceAccountName": c.service_account} if c.service_account else {}
    pod["containers"] = [_k8s_container(job)]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": c.shm_size}}] if c.shm_size else []
    volumes += [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": c.claim}}] if c.claim else []
    if volumes:
        pod["volumes"] = volumes
    if c.node_selector:
        pod["nodeSelector"] = {str(k): str(v) for k, v in c.node_selector.items()}
    return pod


def k8s_manifest(job: Job) -> dict:
    c = job.cluster
    _k8s_checks(job)
    metadata = {"name": c.job_name} | ({"namespace": c.namespace} if c.namespace else {})
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(job.nproc_per_node),
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "rdzvPort": c.rdzv_port,
                "minReplicas": job.nnodes,
                "maxReplicas": job.nnodes,
                "maxRestarts": c.max_restarts,
            },
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": job.nnodes,
                    "restartPolicy": c.restart_policy,
                    "template": {"spec": _k8s_pod(job)},
                },
            },
        },
    }


def render_k8s(job: Job) -> str:
    return header(job) + yaml.safe_dump(k8s_manifest(job), sort_keys=False, width=120)


RENDERERS: dict[type, Callable[[Job], str]] = {
    SlurmCluster: render_slurm,
    K8sCluster: render_k8s,
    LocalCluster: render_local,
}

# -------------------------------------------------------------------------------------------------- api


def make_job(overrides: Sequence[str], config_dir: str | os.PathLike = CONFIG_DIR) -> Job:
    cfg = compose_job(overrides, config_dir)
    if "cluster" not in cfg or not isinstance(cfg.cluster, DictConfig):
        raise JobConfigError("no cluster chosen: pass cluster=" + " | cluster=".join(cluster_options(config_dir)))
    nnodes = _positive_int(cfg, "world.nnodes")
    nproc = _positive_int(cfg, "world.nproc_per_node")
    _check_complete(cfg, Path(config_dir))
    _check_locations(cfg)
    if not 1 <= cfg.cluster.rdzv_port <= 65535:
        raise JobConfigError(f"cluster.rdzv_port={cfg.cluster.rdzv_port} is not a TCP port (1..65535)")
    return Job(cfg, cfg.cluster, nnodes, nproc, passthrough(overrides), list(overrides))


def render_job(job: Job) -> str:
    renderer = RENDERERS.get(OmegaConf.get_type(job.cluster))
    if renderer is None:
        raise JobConfigError(
            "the chosen cluster config does not say what to render: its defaults list must start "
            "with one of " + ", ".join(SCHEMAS) + " (see configs/cluster/slurm.yaml)"
        )
    return renderer(job)


def render(overrides: Sequence[str], config_dir: str | os.PathLike = CONFIG_DIR) -> str:
    """The job text for these overrides (the ``launcher.jobs`` command line without ``--output``)."""
    return render_job(make_job(overrides, config_dir))


SUBMIT = {SlurmCluster: "sbatch {}", K8sCluster: "kubectl apply -f {}", LocalCluster: "bash {}"}


def main(argv: Sequence[str] | None = None, config_dir: str | os.PathLike = CONFIG_DIR) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.jobs",
        description="Render a Slurm / Kubernetes / local job running launcher.save.",
        epilog="example: python -m launcher.jobs cluster=slurm world.nnodes=4 world.nproc_per_node=8 "
        "+model=llama3_70b output.dir=/ckpt/x",
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="write the job to FILE instead of stdout")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides as for launcher.save, plus cluster=NAME "
        "and cluster.KEY=VALUE (options: " + ", ".join(cluster_options(config_dir)) + ")",
    )
    args = parser.parse_args(argv)
    try:
        job = make_job(args.overrides, config_dir)
        text = render_job(job)
    except (JobConfigError, HydraException, OmegaConfBaseException) as e:
        cause = f"\n{e.__cause__}" if e.__cause__ is not None and str(e.__cause__) not in str(e) else ""
        print(f"launcher.jobs: error: {e}{cause}", file=sys.stderr)
        return 2
    if OmegaConf.is_interpolation(job.cfg.world, "nnodes"):
        print(
            f"launcher.jobs: note: world={job.nnodes}x{job.nproc_per_node} comes from this shell's environment "
            "(world=auto); size the job with world.nnodes=N world.nproc_per_node=M or a world option",
            file=sys.stderr,
        )
    if args.output is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    out.write_text(text)
    if text.startswith("#!"):
        out.chmod(0o755)
    submit = SUBMIT[OmegaConf.get_type(job.cluster)].format(shlex.quote(str(out)))
    print(f"wrote {out}; submit it with: {submit}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
