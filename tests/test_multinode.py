"""Multi-node stages as Kubeflow Trainer TrainJobs, through the Kubeflow SDK's TrainerClient
against a faked Kubernetes API (no cluster is reachable here): the submitted object, log
streaming, waiting, the job's own failure reason, timeouts, cancellation, KFP retries, and the
component's path from run-cache miss to the pushed output."""

from __future__ import annotations

import copy
import json
import signal
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from medsight.platform.job_launcher import TrainJobCancelled, TrainJobFailed, TrainJobTimeout
from medsight.platform.multinode import (
    MultiNodeSettings,
    TrainJobRun,
    node_command,
    run_multinode,
    trainjob_request,
)

RUNTIME = Path(__file__).parents[1] / "manifests" / "overlays" / "h100" / "training-runtime.yaml"
NS = "medsight"


class Later:
    """What ``async_req=True`` returns: a thread-like object with ``get``."""

    def __init__(self, value: Any):
        self.value = value

    def get(self, timeout: float | None = None) -> Any:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class FakeCluster:
    """The custom-object and core APIs the SDK calls. Each job (pre-existing or created) follows
    the next scripted timeline of status conditions, advanced by the SDK's poll sleeps (``tick``)."""

    def __init__(self, *timelines: list[list[dict]], pod_phase: str = "Running", logs: str = "step 1\nstep 2\n",
                 real_sleep: float = 0.0):
        self.runtime = yaml.safe_load(RUNTIME.read_text())
        self.runtime["metadata"]["namespace"] = NS
        self.timelines = [list(t) for t in timelines]
        self.timeline: list[list[dict]] = []
        self.now = 0
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.pod_phase = pod_phase
        self.logs = logs
        self.events: list[Any] = []
        self.real_sleep = real_sleep

    def tick(self, seconds: float = 0.0) -> None:
        import time

        time.sleep(self.real_sleep)
        self.now += 1

    def _start_timeline(self) -> None:
        self.timeline, self.now = self.timelines.pop(0), 0

    def preexisting(self, name: str) -> None:
        self._start_timeline()
        self.jobs[name] = {
            "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": NS, "creationTimestamp": "2026-11-29T09:00:00Z"},
            "spec": {"runtimeRef": {"name": "medsight-torch", "kind": "TrainingRuntime"}, "trainer": {"numNodes": 4}},
        }

    # -- CustomObjectsApi
    def get_namespaced_custom_object(self, group, version, namespace, plural, name, async_req=False, **kw):
        assert namespace == NS
        if plural == "trainingruntimes":
            value: Any = self.runtime if name == self.runtime["metadata"]["name"] else ApiException(status=404)
        elif name in self.jobs:
            value = copy.deepcopy(self.jobs[name])
            value["status"] = {"conditions": self.timeline[min(self.now, len(self.timeline) - 1)]}
        else:
            value = ApiException(status=404)
        if async_req:
            return Later(value)
        if isinstance(value, Exception):
            raise value
        return value

    def get_cluster_custom_object(self, group, version, plural, name, async_req=False, **kw):
        return Later(ApiException(status=404))

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(copy.deepcopy(body))
        job = copy.deepcopy(body)
        job["metadata"].update(namespace=namespace, creationTimestamp="2026-11-29T10:00:00Z")
        self.jobs[name] = job
        self._start_timeline()

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        self.deleted.append(name)
        self.jobs.pop(name, None)

    # -- CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector="", async_req=False, **kw):
        pods = []
        for name, job in self.jobs.items():
            for index in range(job["spec"]["trainer"]["numNodes"]):
                pods.append({
                    "metadata": {"name": f"{name}-node-0-{index}", "namespace": NS,
                                 "creationTimestamp": "2026-11-29T10:00:01Z",
                                 "labels": {"jobset.sigs.k8s.io/replicatedjob-name": "node",
                                            "batch.kubernetes.io/job-completion-index": str(index),
                                            "jobset.sigs.k8s.io/jobset-name": name}},
                    "spec": {"containers": [{"name": "node", "image": "img",
                                             "resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
                    "status": {"phase": self.pod_phase},
                })
        return Later(SimpleNamespace(to_dict=lambda: {"items": pods}))

    def read_namespaced_pod_log(self, name, namespace, container=None, follow=False, **kw):
        """The pod's log, as CoreV1Api documents it.

        :param bool follow: Follow the log stream of the pod.
        """
        if not follow:
            return self.logs
        # What the watch stream reads: an HTTP response streamed in chunks.
        return SimpleNamespace(stream=lambda amt=None, decode_content=False: iter([self.logs.encode()]),
                               close=lambda: None, release_conn=lambda: None)

    def list_namespaced_event(self, namespace, async_req=False, **kw):
        return Later(SimpleNamespace(items=self.events))


@pytest.fixture(autouse=True)
def sdk_polls_tick_the_fake(monkeypatch):
    """The SDK's wait loop sleeps between polls; here each sleep advances the faked job."""
    import kubeflow.trainer.backends.kubernetes.backend as backend_module

    clusters: list[FakeCluster] = []
    monkeypatch.setattr(backend_module, "time", SimpleNamespace(sleep=lambda s: clusters[-1].tick(s)))
    FakeCluster.registry = clusters
    yield
    FakeCluster.registry = None


def sdk_client(cluster: FakeCluster):
    """The SDK's TrainerClient on its Kubernetes backend, with the faked APIs in place of a cluster."""
    from kubeflow.trainer import TrainerClient
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend

    FakeCluster.registry.append(cluster)
    backend = object.__new__(KubernetesBackend)  # skips loading a kubeconfig
    backend.custom_api, backend.core_api, backend.namespace = cluster, cluster, NS
    client = object.__new__(TrainerClient)
    client.backend = backend
    return client


SETTINGS = MultiNodeSettings(
    nodes=4, gpus_per_node=8, image="registry.example.com/medsight/medsight:0.1.0", timeout_s=600,
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
)
REFS = {"data": '{"md5": "0a.dir"}', "base": '{"md5": "1b.dir"}', "v2t": ""}


def condition(kind: str, reason: str, message: str = "") -> dict:
    """A status condition as the Trainer writes it."""
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-29T10:00:00Z"}


RUNNING = [condition("Created", "JobSetCreated")]
COMPLETE = [*RUNNING, condition("Complete", "JobSetCompleted")]
FAILED = [*RUNNING, condition("Failed", "TrainingFailed",
                              "jobset failed: node-1 exited with code 1 (rank 9: CUDA out of memory)")]


def _run(cluster: FakeCluster, **kw) -> str:
    runner = TrainJobRun(sdk_client(cluster), poll_interval_s=1, sleep=lambda s: None, **kw)
    trainer, options = trainjob_request(SETTINGS, "instruct-tune", node_command("instruct-tune", "full", ["x=1"], REFS),
                                        "run-42", {"KFP_RUN_ID": "run-42", "AWS_SECRET_ACCESS_KEY": "dummy-never-forwarded"})
    name = runner.submit(SETTINGS.runtime, trainer, options, "ms-instruct-tune-run-42")
    runner.wait(name, SETTINGS.timeout_s)
    return name


def test_submitted_trainjob():
    cluster = FakeCluster([COMPLETE])
    assert _run(cluster) == "ms-instruct-tune-run-42"
    body = cluster.created[0]
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["labels"] == {"app.kubernetes.io/part-of": "medsight", "medsight/stage": "instruct-tune"}
    spec = body["spec"]
    assert spec["runtimeRef"] == {"kind": "TrainingRuntime", "name": "medsight-torch"}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 4 and trainer["image"] == SETTINGS.image
    # Every node runs the user's own store-mode command; torchrun starts a rank per GPU.
    assert trainer["command"] == [
        "medsight", "stage", "run", "instruct-tune", "--store", "--preset", "full", "--nproc-per-node", "auto",
        "--set", "x=1", "--input", 'base={"md5": "1b.dir"}', "--input", 'data={"md5": "0a.dir"}']
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] in ("8", 8)
    # Only the run id is forwarded as plain env; credentials come from the Secret.
    assert trainer["env"] == [{"name": "KFP_RUN_ID", "value": "run-42"}]
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["nodeSelector"] == SETTINGS.node_selector
    assert pod["tolerations"] == list(SETTINGS.tolerations) and pod["securityContext"]["runAsNonRoot"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    (container,) = pod["containers"]
    assert {e["name"] for e in container["env"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all("valueFrom" in e for e in container["env"]) and "never-forwarded" not in json.dumps(body)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_logs_are_streamed_while_waiting():
    cluster = FakeCluster([RUNNING, RUNNING, COMPLETE], logs="loading\nstep 1/10\n", real_sleep=0.2)
    lines: list[str] = []
    done = threading.Event()

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("step"):
            done.set()

    _run(cluster, echo=echo)
    assert done.wait(10) and lines[:2] == ["loading", "step 1/10"]


def test_failure_raises_the_jobs_own_reason_and_keeps_the_job():
    cluster = FakeCluster([RUNNING, FAILED])
    cluster.events = [SimpleNamespace(metadata=SimpleNamespace(), involved_object=SimpleNamespace(kind="Pod", name="x"),
                                      first_timestamp="2026-11-29T10:01:00Z", reason="BackOff", message="restarting")]
    with pytest.raises(TrainJobFailed) as failure:
        _run(cluster)
    assert failure.value.reason == "TrainingFailed"
    assert "CUDA out of memory" in str(failure.value) and "TrainJob ms-instruct-tune-run-42 failed" in str(failure.value)
    assert cluster.deleted == []  # kept for kubectl describe / logs


def test_timeout_deletes_the_job():
    cluster = FakeCluster([RUNNING] * 10_000)
    settings = MultiNodeSettings(**{**SETTINGS.__dict__, "timeout_s": 3})
    runner = TrainJobRun(sdk_client(cluster), poll_interval_s=1, sleep=lambda s: None)
    trainer, options = trainjob_request(settings, "instruct-tune", ["medsight"], "run-42", {})
    name = runner.submit(settings.runtime, trainer, options, "ms-instruct-tune-run-42")
    with pytest.raises(TrainJobTimeout, match="did not finish within 3 s"):
        runner.wait(name, 3)
    assert cluster.deleted == [name]


def test_sigterm_from_kfp_cancels_and_deletes_the_job():
    cluster = FakeCluster([RUNNING] * 10_000, real_sleep=0.05)
    client = sdk_client(cluster)
    runner = TrainJobRun(client, poll_interval_s=1)
    trainer, options = trainjob_request(SETTINGS, "instruct-tune", ["medsight"], "run-42", {})
    name = runner.submit(SETTINGS.runtime, trainer, options, "ms-instruct-tune-run-42")
    threading.Timer(0.5, lambda: signal.raise_signal(signal.SIGTERM)).start()
    with pytest.raises(TrainJobCancelled):
        runner.wait(name, 600)
    assert cluster.deleted == [name]


def test_kfp_retry_adopts_a_running_job():
    cluster = FakeCluster([RUNNING, COMPLETE])
    cluster.preexisting("ms-instruct-tune-run-42")
    _run(cluster)
    assert cluster.created == [] and cluster.deleted == []


def test_kfp_retry_replaces_a_failed_job():
    cluster = FakeCluster([FAILED], [RUNNING, COMPLETE])
    cluster.preexisting("ms-instruct-tune-run-42")
    _run(cluster)
    assert len(cluster.created) == 1 and cluster.deleted == ["ms-instruct-tune-run-42"]


def test_settings_come_from_the_compiled_env():
    assert MultiNodeSettings.from_env({}) is None
    assert MultiNodeSettings.from_env({"MEDSIGHT_TRAINJOB_NODES": "1"}) is None
    settings = MultiNodeSettings.from_env({
        "MEDSIGHT_TRAINJOB_NODES": "2", "MEDSIGHT_TRAINJOB_GPUS_PER_NODE": "8", "MEDSIGHT_TRAINJOB_IMAGE": "img",
        "MEDSIGHT_TRAINJOB_NODE_LABEL_KEY": "pool", "MEDSIGHT_TRAINJOB_NODE_LABEL_VALUE": "h100",
        "MEDSIGHT_TRAINJOB_TAINT_KEY": "nvidia.com/gpu",
    })
    assert settings.nodes == 2 and settings.node_selector == {"pool": "h100"}
    assert settings.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.mark.parametrize("looked_up", [False, True])
def test_component_runs_a_trainjob_on_a_run_cache_miss_then_reads_the_pushed_output(monkeypatch, looked_up):
    """The component's path: miss -> TrainJob (whose first node pushes and records) -> hit. The
    component's own body has already seen the miss (looked_up): the store is asked once, not twice."""
    import medsight.platform.component_runtime as runtime

    results = iter(([] if looked_up else [None]) + [SimpleNamespace(stage="instruct-tune", ref=SimpleNamespace(to_json=lambda: '{"md5": "9f.dir"}'),
                                          cached=True, metrics={"val_lm_loss": 1.5}, seconds=0.0, cache_key="k",
                                          inputs={})])
    calls: list[str] = []
    monkeypatch.setattr(runtime, "execute_stage", lambda *a, **k: calls.append("lookup") or next(results))
    cluster = FakeCluster([COMPLETE])
    from medsight.platform.multinode import multinode_outcome

    outcome = multinode_outcome("instruct-tune", "tiny", [], REFS, SETTINGS, client=sdk_client(cluster), looked_up=looked_up)
    assert calls == ["lookup"] * (1 if looked_up else 2) and len(cluster.created) == 1
    assert outcome["ref"] == {"md5": "9f.dir"} and outcome["cached"] is False and outcome["metrics"] == {"val_lm_loss": 1.5}


def test_run_multinode_uses_the_run_id_for_the_job_name():
    cluster = FakeCluster([COMPLETE])
    name = run_multinode("t2v-align", "full", [], REFS, SETTINGS, client=sdk_client(cluster), run_id="Run_7")
    assert name == "ms-t2v-align-run-7" and cluster.created[0]["metadata"]["name"] == name
