"""A stage across several nodes: a Kubeflow Trainer TrainJob submitted by the stage's component.

Which stages go multi-node is a deployment setting (``DeploymentSettings.nodes``); the compiled
component then carries ``MEDSIGHT_TRAINJOB_*`` env and, instead of training in its own pod,

1. returns at once when the store's run-cache already holds the output;
2. submits a TrainJob through the Kubeflow SDK's ``TrainerClient``: numNodes x GPUs per node,
   the same image, and on every node the same command a user runs by hand,
   ``medsight stage run NAME --store --nproc-per-node auto ...``: each node pulls the inputs,
   starts one rank per GPU through torchrun (rendezvous from the operator's ``PET_*`` env), and
   the first node pushes the output and records it in the run-cache;
3. streams node 0's log, waits for a terminal condition, and fails with the job's own reason;
4. reads the pushed output's reference back from the run-cache, as for a cache hit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medsight.platform.job_launcher import TrainJobCancelled, TrainJobFailed, TrainJobTimeout, _sigterm_raises
from medsight.platform.trainjob import (
    CONTAINER_SECURITY,
    POD_SECURITY,
    RESERVED_ENV,
    S3_SECRET_ENV,
    TRAINER_CONTAINER,
    job_name,
)

log = logging.getLogger(__name__)

NODES_ENV = "MEDSIGHT_TRAINJOB_NODES"
PREFIX = "MEDSIGHT_TRAINJOB_"
# Passed to every node: what identifies the run and how the stage behaves, never credentials
# (those come from Secrets through the runtime or the patch below).
FORWARDED_ENV = ("KFP_RUN_ID", "MEDSIGHT_FORCE_RERUN", "MEDSIGHT_WORK_DIR", "MLFLOW_EXPERIMENT_NAME")


@dataclass(frozen=True)
class MultiNodeSettings:
    """What the compiled component knows about the job it submits (from ``MEDSIGHT_TRAINJOB_*``)."""

    nodes: int
    gpus_per_node: int
    image: str
    namespace: str = "medsight"
    runtime: str = "medsight-torch"
    cpu_per_node: str = "96"
    memory_per_node: str = "960G"
    shm_size: str = "64Gi"
    timeout_s: int = 72 * 3600
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, str]] = ()
    service_account: str = "medsight-workload"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MultiNodeSettings | None:
        """None when this stage runs in its own pod (one node)."""
        env = os.environ if environ is None else environ
        nodes = int(env.get(NODES_ENV, "1") or 1)
        if nodes <= 1:
            return None
        selector, tolerations = {}, []
        if env.get(PREFIX + "NODE_LABEL_KEY"):
            selector[env[PREFIX + "NODE_LABEL_KEY"]] = env.get(PREFIX + "NODE_LABEL_VALUE", "")
        if env.get(PREFIX + "TAINT_KEY"):
            tolerations.append({"key": env[PREFIX + "TAINT_KEY"], "operator": "Exists", "effect": "NoSchedule"})
        return cls(
            nodes=nodes,
            gpus_per_node=int(env.get(PREFIX + "GPUS_PER_NODE", "8")),
            image=env[PREFIX + "IMAGE"],
            namespace=env.get(PREFIX + "NAMESPACE") or env.get("POD_NAMESPACE", "medsight"),
            runtime=env.get(PREFIX + "RUNTIME", "medsight-torch"),
            cpu_per_node=env.get(PREFIX + "CPU", "96"),
            memory_per_node=env.get(PREFIX + "MEMORY", "960G"),
            shm_size=env.get(PREFIX + "SHM", "64Gi"),
            timeout_s=int(env.get(PREFIX + "TIMEOUT_S", str(72 * 3600))),
            node_selector=selector,
            tolerations=tolerations,
        )


def node_command(stage: str, preset: str, overrides: Sequence[str], refs: Mapping[str, str]) -> list[str]:
    """What every node runs: the store-mode stage, one rank per visible GPU."""
    command = ["medsight", "stage", "run", stage, "--store", "--preset", preset, "--nproc-per-node", "auto"]
    for override in overrides:
        command += ["--set", override]
    for name, ref in sorted(refs.items()):
        if ref:
            command += ["--input", f"{name}={ref}"]
    return command


def trainjob_request(settings: MultiNodeSettings, stage: str, command: list[str], run_id: str,
                     environ: Mapping[str, str] | None = None) -> tuple[Any, list]:
    """The SDK's trainer and options for the stage's TrainJob."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import (
        ContainerPatch,
        JobSetSpecPatch,
        JobSetTemplatePatch,
        JobSpecPatch,
        JobTemplatePatch,
        Labels,
        Name,
        PodSpecPatch,
        PodTemplatePatch,
        ReplicatedJobPatch,
        RuntimePatch,
        TrainerCommand,
        TrainingRuntimeSpecPatch,
    )

    env = os.environ if environ is None else environ
    plain = {name: env[name] for name in FORWARDED_ENV if env.get(name)}
    refused = sorted(n for n in plain if n in RESERVED_ENV or n.startswith("PET_"))
    if refused:
        raise ValueError(f"env {refused[0]} is set by the operator for each rank; it cannot be forwarded")
    trainer = CustomTrainerContainer(
        image=settings.image,
        num_nodes=settings.nodes,
        resources_per_node={"gpu": settings.gpus_per_node, "cpu": settings.cpu_per_node,
                            "memory": settings.memory_per_node},
        env=plain,
    )
    secrets = [{"name": s.env, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key}}} for s in S3_SECRET_ENV]
    container = ContainerPatch(
        name=TRAINER_CONTAINER,
        env=secrets,
        volume_mounts=[{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
        security_context=dict(CONTAINER_SECURITY),
    )
    pod = PodSpecPatch(
        service_account_name=settings.service_account,
        # NCCL and DataLoader workers share tensors through /dev/shm (64 MiB by default).
        volumes=[{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
                 {"name": "tmp", "emptyDir": {}}],
        node_selector=dict(settings.node_selector) or None,
        tolerations=[dict(t) for t in settings.tolerations] or None,
        security_context=dict(POD_SECURITY),
        containers=[container],
    )
    patch = RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(template=JobSetTemplatePatch(
        spec=JobSetSpecPatch(replicated_jobs=[ReplicatedJobPatch(
            name=TRAINER_CONTAINER,
            template=JobTemplatePatch(spec=JobSpecPatch(template=PodTemplatePatch(spec=pod))),
        )])
    )))
    options = [
        Name(job_name(stage, run_id)),
        Labels({"app.kubernetes.io/part-of": "medsight", "medsight/stage": stage}),
        TrainerCommand(command),
        patch,
    ]
    return trainer, options


class TrainJobRun:
    """Submit one TrainJob through ``TrainerClient``, stream its log, wait, report its reason."""

    def __init__(self, client: Any, *, poll_interval_s: int = 15, echo: Callable[[str], None] = print,
                 sleep: Callable[[float], None] = time.sleep):
        self.client = client
        self.poll_interval_s = poll_interval_s
        self.echo = echo
        self.sleep = sleep

    def submit(self, runtime: str, trainer: Any, options: list, name: str) -> str:
        """Create the TrainJob. A KFP retry finds the job of its first attempt (same name): a
        running or complete one is adopted, a failed one replaced."""
        from kubeflow.trainer.constants import constants

        try:
            return self.client.train(runtime=runtime, trainer=trainer, options=options)
        except RuntimeError as error:
            if getattr(error.__cause__, "status", None) != 409:
                raise
        job = self.client.get_job(name)
        if job.status != constants.TRAINJOB_FAILED:
            log.warning("TrainJob %s exists from an earlier attempt (%s); adopting it", name, job.status)
            return name
        log.warning("TrainJob %s failed in an earlier attempt; replacing it", name)
        self.client.delete_job(name)
        for _ in range(120):
            try:
                self.client.get_job(name)
            except RuntimeError:
                break  # gone
            self.sleep(5)
        return self.client.train(runtime=runtime, trainer=trainer, options=options)

    def _failure(self, name: str) -> TrainJobFailed:
        # Hand-built: the SDK's TrainJob carries only the status word ("Failed"), not the
        # condition's reason and message, which are what the user needs to act on.
        backend = self.client.backend
        from kubeflow.trainer.constants import constants

        obj = backend.custom_api.get_namespaced_custom_object(
            constants.GROUP, constants.VERSION, backend.namespace, constants.TRAINJOB_PLURAL, name)
        if hasattr(obj, "get") and not isinstance(obj, dict):
            obj = obj.get()
        condition = next((c for c in (obj.get("status") or {}).get("conditions") or []
                          if c.get("type") == constants.TRAINJOB_FAILED and str(c.get("status")) == "True"), {})
        try:
            events = [f"{e.involved_object_kind}/{e.involved_object_name}: {e.reason}: {e.message}"
                      for e in self.client.get_job_events(name)[-5:]]
        except Exception as error:  # events are a courtesy; the reason is reported anyway
            events = [f"(could not read events: {error})"]
        return TrainJobFailed("TrainJob", name, str(condition.get("reason", "Failed")),
                              str(condition.get("message", "")), "\n".join(events))

    def _stream(self, name: str, stop: threading.Event) -> None:
        """Node 0's log, line by line, once its pod has started (a daemon thread)."""
        from kubeflow.trainer.constants import constants

        while not stop.is_set():
            try:
                job = self.client.get_job(name)
                node = next((s for s in job.steps if s.name == f"{constants.NODE}-0"), None)
                if node is not None and node.status != constants.POD_PENDING:
                    for line in self.client.get_job_logs(name, follow=True):
                        self.echo(line.rstrip("\n"))
                    return
            except Exception as error:  # the log is a courtesy; waiting decides the outcome
                log.debug("log stream of %s: %s", name, error)
            stop.wait(self.poll_interval_s)

    def wait(self, name: str, timeout_s: int) -> Any:
        """The finished TrainJob; ``TrainJobFailed`` (its reason), ``TrainJobTimeout`` (deleted)
        or ``TrainJobCancelled`` (SIGTERM from KFP, Ctrl-C: deleted)."""
        from kubeflow.trainer.constants import constants

        stop = threading.Event()
        streamer = threading.Thread(target=self._stream, args=(name, stop), daemon=True)
        streamer.start()
        try:
            with _sigterm_raises(enabled=True):
                job = self.client.wait_for_job_status(
                    name, status={constants.TRAINJOB_COMPLETE, constants.TRAINJOB_FAILED},
                    timeout=timeout_s, polling_interval=self.poll_interval_s,
                )
        except TimeoutError as error:
            self.client.delete_job(name)
            raise TrainJobTimeout(f"TrainJob {name} did not finish within {timeout_s} s; deleted") from error
        except (TrainJobCancelled, KeyboardInterrupt):
            self.client.delete_job(name)
            raise
        finally:
            stop.set()
        if job.status == constants.TRAINJOB_FAILED:
            # Kept, not deleted: its pods and events stay for `kubectl describe`.
            raise self._failure(name)
        return job


def default_client(namespace: str) -> Any:
    """The SDK client on the in-cluster ServiceAccount (the pipeline pod's)."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    return TrainerClient(KubernetesBackendConfig(namespace=namespace))


def run_multinode(stage: str, preset: str, overrides: Sequence[str], refs: Mapping[str, str],
                  settings: MultiNodeSettings, client: Any = None, run_id: str | None = None) -> str:
    """Submit the stage's TrainJob and wait for it; returns the job name."""
    run_id = run_id or os.environ.get("KFP_RUN_ID") or time.strftime("adhoc-%Y%m%d-%H%M%S")
    runner = TrainJobRun(client or default_client(settings.namespace))
    trainer, options = trainjob_request(settings, stage, node_command(stage, preset, overrides, refs), run_id)
    name = runner.submit(settings.runtime, trainer, options, job_name(stage, run_id))
    log.info("submitted TrainJob %s/%s: %d nodes x %d GPUs", settings.namespace, name, settings.nodes,
             settings.gpus_per_node)
    runner.wait(name, settings.timeout_s)
    return name


def multinode_outcome(stage: str, preset: str, overrides: Sequence[str], refs: Mapping[str, str], settings: Any,
                      client: Any = None, looked_up: bool = False) -> dict[str, Any]:
    """A stage whose deployment asks for several nodes: restored from the run-cache, or run as a
    TrainJob whose first node pushes the output, then read back from the run-cache.
    ``looked_up``: the caller already found no run-cache entry (the component checks first)."""
    from medsight.platform import component_runtime as runtime

    config = runtime.resolve_config(preset, overrides)
    skip_lookup = looked_up or runtime._forced(stage)
    found = None if skip_lookup else runtime.execute_stage(stage, refs, config, compute=False)
    if found is None:
        run_multinode(stage, preset, list(overrides), refs, settings, client=client)
        found = runtime.execute_stage(stage, refs, config, compute=False)
        if found is None:
            raise RuntimeError(
                f"stage {stage}: the TrainJob completed but its output is not in the run-cache; its first "
                "node's log says why (an output that read settings outside its view is never cached)"
            )
        found.cached = False
    return runtime.outcome(found)
