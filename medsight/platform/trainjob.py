"""Hand-built multi-node jobs for what the Kubeflow SDK cannot express.

The pipeline's multi-node stages go through the SDK's ``TrainerClient`` (``multinode.py``). This
module builds the objects it has no API for: a TrainJob with ``podTemplateOverrides`` (Trainer
releases before ``runtimePatches``, the only pod-override field the SDK writes) and the
training-operator v1 ``PyTorchJob`` (clusters without Trainer v2). `TrainJobLauncher` creates
one, waits for a terminal condition and deletes it when the component is cancelled.
Rendezvous (MASTER_ADDR, node rank, world size) is injected by the operator through the
``PET_*`` variables torchrun reads; this module never sets them, and refuses env that would.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# Re-exported: callers build and launch from one module.
from medsight.platform.job_launcher import (  # noqa: F401
    PYTORCHJOB,
    TRAINJOB,
    JobKind,
    JobOutcome,
    TrainJobCancelled,
    TrainJobError,
    TrainJobFailed,
    TrainJobLauncher,
    TrainJobTimeout,
)

S3_SECRET_NAME = "medsight-s3-credentials"
# Set by the operator / torchrun for every rank; a value from us would break rendezvous.
RESERVED_ENV = frozenset(
    {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"}
)
# Container names the operators require: the Trainer's torch runtimes and PyTorchJob.
TRAINER_CONTAINER = "node"
PYTORCHJOB_CONTAINER = "pytorch"



@dataclass(frozen=True)
class SecretEnv:
    """Environment variable `env` taken from key `key` of Secret `secret`."""

    env: str
    secret: str
    key: str


S3_SECRET_ENV = (
    SecretEnv("AWS_ACCESS_KEY_ID", S3_SECRET_NAME, "AWS_ACCESS_KEY_ID"),
    SecretEnv("AWS_SECRET_ACCESS_KEY", S3_SECRET_NAME, "AWS_SECRET_ACCESS_KEY"),
)


@dataclass(frozen=True)
class StageInvocation:
    """`medsight stage run NAME --out DIR --input NAME=DIR ... --preset P --set key=value`."""

    stage: str
    out: str
    inputs: Mapping[str, str] = field(default_factory=dict)
    preset: str = "full"
    overrides: Mapping[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        args = ["medsight", "stage", "run", self.stage, "--out", self.out]
        for name, path in sorted(self.inputs.items()):
            args += ["--input", f"{name}={path}"]
        args += ["--preset", self.preset]
        for key, value in sorted(self.overrides.items()):
            args += ["--set", f"{key}={value}"]
        return args


_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# JobSet/PyTorchJob derive pod and Service names from the job name; keep room for suffixes.
MAX_NAME_LEN = 45


def job_name(stage: str, run_id: str) -> str:
    """An RFC 1035 label unique per (KFP run, stage), short enough for derived pod names."""
    raw = re.sub(r"[^a-z0-9-]+", "-", f"ms-{stage}-{run_id}".lower()).strip("-")
    return re.sub(r"-+", "-", raw)[:MAX_NAME_LEN].rstrip("-")


@dataclass(frozen=True)
class MultiNodeJob:
    name: str
    image: str
    invocation: StageInvocation
    num_nodes: int
    gpus_per_node: int = 8
    cpu_per_node: str = "48"
    memory_per_node: str = "512Gi"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, str]] = ()
    shm_size: str = "64Gi"
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Sequence[SecretEnv] = S3_SECRET_ENV
    service_account: str | None = "medsight-workload"
    # PyTorchJob only: neither TrainJob override API carries it, the runtime template sets it.
    priority_class: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # Trainer v2 runtime: the stock ClusterTrainingRuntime, or the overlay's TrainingRuntime
    # "medsight-torch" (kind TrainingRuntime) that already carries pool scheduling.
    runtime_name: str = "torch-distributed"
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    launcher: Sequence[str] = ("torchrun", "--no-python")
    backoff_limit: int = 0  # PyTorchJob only: a failed rank fails the job; the stage resumes

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name) or len(self.name) > MAX_NAME_LEN:
            raise ValueError(
                f"job name {self.name!r}: must be an RFC 1035 label of at most {MAX_NAME_LEN} "
                "characters (use trainjob.job_name())"
            )
        if self.num_nodes < 1:
            raise ValueError(f"job {self.name}: num_nodes must be >= 1, got {self.num_nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"job {self.name}: gpus_per_node must be >= 0")
        names = list(self.env) + [s.env for s in self.secret_env]
        for name in names:
            if name in RESERVED_ENV or name.startswith("PET_"):
                raise ValueError(
                    f"job {self.name}: env {name} is set by the operator for each rank; remove it"
                )

    def command(self) -> list[str]:
        return [*self.launcher, *self.invocation.argv()]

    def env_list(self) -> list[dict[str, Any]]:
        env: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in sorted(self.env.items())]
        env += [
            {"name": s.env, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key}}}
            for s in self.secret_env
        ]
        return env

    def resources(self) -> dict[str, dict[str, str]]:
        amounts = {"cpu": self.cpu_per_node, "memory": self.memory_per_node}
        if self.gpus_per_node:
            amounts["nvidia.com/gpu"] = str(self.gpus_per_node)
        # requests == limits: GPU nodes are packed whole, and a noisy neighbour is worse than
        # an unused core.
        return {"requests": dict(amounts), "limits": dict(amounts)}

    def volumes(self) -> list[dict[str, Any]]:
        return [
            # NCCL and DataLoader workers share tensors through /dev/shm (64 MiB by default).
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}},
            {"name": "tmp", "emptyDir": {}},
        ]

    @staticmethod
    def volume_mounts() -> list[dict[str, str]]:
        return [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]


POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def gpu_pool_from_env(
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Node selector and tolerations from the medsight-platform ConfigMap keys (h100 overlay)."""
    environ = os.environ if environ is None else environ
    selector: dict[str, str] = {}
    tolerations: list[dict[str, str]] = []
    key = environ.get("MEDSIGHT_GPU_NODE_LABEL_KEY")
    if key:
        selector[key] = environ.get("MEDSIGHT_GPU_NODE_LABEL_VALUE", "")
    taint = environ.get("MEDSIGHT_GPU_TAINT_KEY")
    if taint:
        tolerations.append({"key": taint, "operator": "Exists", "effect": "NoSchedule"})
    return selector, tolerations


def _metadata(job: MultiNodeJob) -> dict[str, Any]:
    labels = {"app.kubernetes.io/part-of": "medsight", "medsight/stage": job.invocation.stage}
    labels.update(job.labels)
    return {"name": job.name, "labels": labels}


def _pod_overrides(job: MultiNodeJob) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "volumes": job.volumes(),
        "containers": [{"name": TRAINER_CONTAINER, "volumeMounts": job.volume_mounts()}],
    }
    if job.service_account:
        spec["serviceAccountName"] = job.service_account
    if job.node_selector:
        spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        spec["tolerations"] = [dict(t) for t in job.tolerations]
    return spec


def build_trainjob(job: MultiNodeJob) -> dict[str, Any]:
    """A trainer.kubeflow.org/v1alpha1 TrainJob for `job`, pod settings in `podTemplateOverrides`.

    Hand-built because the Kubeflow SDK writes pod overrides only as `runtimePatches`, which
    Trainer v2.0/v2.1 do not serve; on newer Trainers use `multinode.run_multinode` (the SDK).
    The older field cannot carry securityContext: the runtime (e.g. the overlay's medsight-torch)
    must set it, as it does.
    """
    body: dict[str, Any] = {
        "apiVersion": TRAINJOB.api_version,
        "kind": TRAINJOB.kind,
        "metadata": _metadata(job),
        "spec": {
            "runtimeRef": {
                "name": job.runtime_name,
                "apiGroup": TRAINJOB.group,
                "kind": job.runtime_kind,
            },
            "trainer": {
                "image": job.image,
                "command": job.command(),
                "env": job.env_list(),
                "numNodes": job.num_nodes,
                "numProcPerNode": max(job.gpus_per_node, 1),
                "resourcesPerNode": job.resources(),
            },
        },
    }
    body["spec"]["podTemplateOverrides"] = [
        {"targetJobs": [{"name": TRAINER_CONTAINER}], "spec": _pod_overrides(job)}
    ]
    return body


def build_pytorchjob(job: MultiNodeJob) -> dict[str, Any]:
    """A kubeflow.org/v1 PyTorchJob for `job` (training-operator v1, where Trainer v2 is absent).

    With `nprocPerNode` set the operator exports PET_NNODES/PET_NODE_RANK/PET_MASTER_ADDR/... for
    torchrun, exactly as the Trainer does.
    """
    pod_spec: dict[str, Any] = {
        "securityContext": dict(POD_SECURITY),
        "volumes": job.volumes(),
        "containers": [
            {
                "name": PYTORCHJOB_CONTAINER,
                "image": job.image,
                "command": job.command(),
                "env": job.env_list(),
                "resources": job.resources(),
                "volumeMounts": job.volume_mounts(),
                "securityContext": dict(CONTAINER_SECURITY),
            }
        ],
    }
    if job.service_account:
        pod_spec["serviceAccountName"] = job.service_account
        pod_spec["automountServiceAccountToken"] = False
    if job.node_selector:
        pod_spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in job.tolerations]
    if job.priority_class:
        pod_spec["priorityClassName"] = job.priority_class

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "Never", "template": {"spec": pod_spec}}

    replicas = {"Master": replica(1)}
    if job.num_nodes > 1:
        replicas["Worker"] = replica(job.num_nodes - 1)
    return {
        "apiVersion": PYTORCHJOB.api_version,
        "kind": PYTORCHJOB.kind,
        "metadata": _metadata(job),
        "spec": {
            "nprocPerNode": str(max(job.gpus_per_node, 1)),
            "runPolicy": {"backoffLimit": job.backoff_limit, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }
