"""Compile-time deployment settings: how stage pods are scheduled on a given cluster.

Nothing here is cloud-specific: the GPU pool is whatever node label/taint the cluster uses
(defaults follow the NVIDIA GPU operator's labels, as in manifests/overlays/h100/gpu-pool.env).
Override them with a YAML file: ``medsight platform compile --settings my-cluster.yaml``.
Accelerator counts must be literals in the compiled YAML (KFP cannot take them from pipeline
parameters), which is why they live here and not in the pipeline's parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kfp import kubernetes
from kfp.dsl import PipelineTask

from medsight.stages.registry import StageSpec

ALLOWED_GPU_COUNTS = (1, 2, 4, 8, 16)  # KFP's accelerator-limit allow-list (0 = CPU stage)


@dataclass
class DeploymentSettings:
    gpu_image: str = "registry.example.com/medsight/medsight:0.1.0"
    cpu_image: str = "registry.example.com/medsight/medsight-cpu:0.1.0"
    gpu_node_label_key: str = "nvidia.com/gpu.product"
    gpu_node_label_value: str = "NVIDIA-H100-80GB-HBM3"
    gpu_taint_key: str = "nvidia.com/gpu"
    # GPUs per pod by the registry's resource class (medsight/stages/registry.py); "cpu" stages
    # run on the CPU pool. ``gpus`` overrides the count for single stages, e.g. {evaluate: 4}.
    gpus_per_class: dict[str, int] = field(default_factory=lambda: {"gpu": 1, "gpu-deepspeed": 8})
    gpus: dict[str, int] = field(default_factory=dict)
    # Stages that run on several nodes (each with its GPU count above) as a Kubeflow Trainer
    # TrainJob that the stage's component submits and waits on, e.g. {instruct-tune: 4}.
    nodes: dict[str, int] = field(default_factory=dict)
    trainer_runtime: str = "medsight-torch"  # the h100 overlay's TrainingRuntime
    namespace: str = "medsight"
    # Per-GPU host resources; an 8-GPU stage asks for 8x these.
    cpu_per_gpu: int = 12
    memory_per_gpu: str = "120G"
    cpu_stage_cpu: int = 8
    cpu_stage_memory: str = "32G"
    shm_size: str = "64Gi"  # DataLoader workers + NCCL use /dev/shm
    platform_config_map: str = "medsight-platform"
    s3_secret: str = "medsight-s3-credentials"
    mlflow_secret: str = "medsight-mlflow-credentials"  # optional: only if MLflow has auth
    gpu_timeout_s: int = 72 * 3600
    cpu_timeout_s: int = 6 * 3600
    retries: int = 2
    # The variants the ablation pipeline holds (registry names); empty = every registered one.
    ablation_variants: list[str] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: Path) -> DeploymentSettings:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: deployment settings file not found")
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
        settings = cls(**data)
        settings.validate(str(path))
        return settings

    def validate(self, source: str = "deployment settings") -> None:
        from medsight.stages.registry import get_stage, get_variant

        for stage, count in self.gpus.items():
            try:
                spec = get_stage(stage)
            except KeyError as error:
                raise ValueError(f"{source}: gpus.{stage}: {error.args[0]}") from error
            if spec.resources == "cpu":
                raise ValueError(f"{source}: gpus.{stage}: a CPU stage (resource class 'cpu') takes no GPUs")
            if count not in ALLOWED_GPU_COUNTS:
                raise ValueError(f"{source}: gpus.{stage}={count}; KFP allows {ALLOWED_GPU_COUNTS}")
        for stage, count in self.nodes.items():
            try:
                spec = get_stage(stage)
            except KeyError as error:
                raise ValueError(f"{source}: nodes.{stage}: {error.args[0]}") from error
            if spec.resources == "cpu":
                raise ValueError(f"{source}: nodes.{stage}: a CPU stage (resource class 'cpu') runs on one pod")
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"{source}: nodes.{stage}={count!r}; give a whole number of nodes >= 1")
        for name in self.ablation_variants:
            try:
                get_variant(name)
            except KeyError as error:
                raise ValueError(f"{source}: ablation_variants: {error.args[0]}") from error
        for name, count in self.gpus_per_class.items():
            if count not in ALLOWED_GPU_COUNTS:
                raise ValueError(f"{source}: gpus_per_class.{name}={count}; KFP allows {ALLOWED_GPU_COUNTS}")

    def ablation_variant_names(self) -> list[str]:
        from medsight.stages.registry import VARIANTS, get_variant

        return [get_variant(name).name for name in self.ablation_variants] or [v.name for v in VARIANTS]

    def gpus_for(self, spec: StageSpec) -> int:
        """GPUs the stage's pod asks for (0 = CPU pool)."""
        if spec.resources == "cpu":
            return 0
        return self.gpus.get(spec.name, self.gpus_per_class[spec.resources])

    def nodes_for(self, spec: StageSpec) -> int:
        """Nodes the stage trains on (1 = its own pod; more = a TrainJob)."""
        return self.nodes.get(spec.name, 1) if spec.resources != "cpu" else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ConfigMap key (manifests/base/platform.env) -> environment variable the runtime reads.
CONFIG_MAP_ENV = {
    "MEDSIGHT_S3_ENDPOINT_URL": "MEDSIGHT_S3_ENDPOINT",
    "MEDSIGHT_DVC_REMOTE_URL": "MEDSIGHT_STORE_URL",
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
}


def _common(task: PipelineTask, settings: DeploymentSettings, timeout_s: int) -> None:
    task.set_caching_options(True)
    kubernetes.use_config_map_as_env(task, settings.platform_config_map, dict(CONFIG_MAP_ENV))
    kubernetes.use_secret_as_env(
        task, settings.s3_secret, {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
    )
    kubernetes.use_secret_as_env(
        task,
        settings.mlflow_secret,
        {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"},
        optional=True,
    )
    # No library phones home from a training pod (DVC analytics, MLflow 3 telemetry).
    task.set_env_variable("DVC_NO_ANALYTICS", "1")
    task.set_env_variable("MLFLOW_DISABLE_TELEMETRY", "true")
    # The run id comes from the pod label, not a parameter: a parameter would defeat KFP caching.
    kubernetes.use_field_path_as_env(task, "KFP_RUN_ID", "metadata.labels['pipeline/runid']")
    kubernetes.set_timeout(task, timeout_s)


def keep_off_gpu_pool(task: PipelineTask, settings: DeploymentSettings) -> PipelineTask:
    kubernetes.add_node_affinity(
        task,
        match_expressions=[
            {"key": settings.gpu_node_label_key, "operator": "NotIn", "values": [settings.gpu_node_label_value]}
        ],
    )
    return task


def configure_stage(task: PipelineTask, spec: StageSpec, settings: DeploymentSettings) -> PipelineTask:
    """Image, resources, scheduling, secrets and retries for one stage task."""
    task.set_display_name(spec.name)
    gpus = settings.gpus_for(spec)
    if gpus and settings.nodes_for(spec) > 1:
        _submits_trainjob(task, spec, settings, gpus)
    elif gpus:
        task.set_container_image(settings.gpu_image)
        _common(task, settings, settings.gpu_timeout_s)
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
        task.set_cpu_request(str(settings.cpu_per_gpu * gpus)).set_cpu_limit(str(settings.cpu_per_gpu * gpus))
        memory = _scale(settings.memory_per_gpu, gpus)
        task.set_memory_request(memory).set_memory_limit(memory)
        kubernetes.add_node_selector(task, settings.gpu_node_label_key, settings.gpu_node_label_value)
        kubernetes.add_toleration(task, key=settings.gpu_taint_key, operator="Exists", effect="NoSchedule")
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=settings.shm_size)
        # The component starts one rank per GPU through torchrun (medsight.platform.component_runtime).
        task.set_env_variable("MEDSIGHT_NPROC_PER_NODE", str(gpus))
    else:
        task.set_container_image(settings.cpu_image)
        _common(task, settings, settings.cpu_timeout_s)
        task.set_cpu_request(str(settings.cpu_stage_cpu)).set_cpu_limit(str(settings.cpu_stage_cpu))
        task.set_memory_request(settings.cpu_stage_memory).set_memory_limit(settings.cpu_stage_memory)
        keep_off_gpu_pool(task, settings)
    # Preemption and node loss are retried; a deterministic error fails the same way each time.
    task.set_retry(num_retries=settings.retries, backoff_duration="60s", backoff_factor=2.0)
    return task


def _submits_trainjob(task: PipelineTask, spec: StageSpec, settings: DeploymentSettings, gpus: int) -> None:
    """A multi-node stage: the component is a small pod off the GPU pool that submits a TrainJob
    (numNodes x gpus, the GPU image) and waits on it; the env below is all it needs to build it."""
    _common(task, settings, settings.gpu_timeout_s)
    task.set_container_image(settings.cpu_image)
    task.set_cpu_request("1").set_cpu_limit("2")
    task.set_memory_request("2G").set_memory_limit("4G")
    keep_off_gpu_pool(task, settings)
    env = {
        "NODES": settings.nodes_for(spec), "GPUS_PER_NODE": gpus, "IMAGE": settings.gpu_image,
        "RUNTIME": settings.trainer_runtime, "NAMESPACE": settings.namespace,
        "CPU": settings.cpu_per_gpu * gpus, "MEMORY": _scale(settings.memory_per_gpu, gpus), "SHM": settings.shm_size,
        "TIMEOUT_S": settings.gpu_timeout_s, "NODE_LABEL_KEY": settings.gpu_node_label_key,
        "NODE_LABEL_VALUE": settings.gpu_node_label_value, "TAINT_KEY": settings.gpu_taint_key,
    }
    for key, value in env.items():
        task.set_env_variable(f"MEDSIGHT_TRAINJOB_{key}", str(value))


def configure_helper(task: PipelineTask, settings: DeploymentSettings, name: str) -> PipelineTask:
    """Tiny bookkeeping steps: CPU image, small requests, never on a GPU node."""
    task.set_display_name(name)
    task.set_container_image(settings.cpu_image)
    task.set_caching_options(True)
    task.set_cpu_request("1").set_memory_request("2G")
    keep_off_gpu_pool(task, settings)
    return task


def configure_reader(task: PipelineTask, settings: DeploymentSettings, name: str) -> PipelineTask:
    """A helper that reads the store (e.g. the ablation comparison) needs its credentials too."""
    configure_helper(task, settings, name)
    _common(task, settings, settings.cpu_timeout_s)
    return task


def _scale(quantity: str, factor: int) -> str:
    digits = "".join(c for c in quantity if c.isdigit())
    unit = quantity[len(digits):]
    return f"{int(digits) * factor}{unit}"
