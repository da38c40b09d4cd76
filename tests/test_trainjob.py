"""TrainJob / PyTorchJob objects and the launcher, against a scripted fake CustomObjectsApi."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client.exceptions import ApiException

from medsight.platform.trainjob import (
    PYTORCHJOB,
    TRAINJOB,
    MultiNodeJob,
    SecretEnv,
    StageInvocation,
    TrainJobCancelled,
    TrainJobError,
    TrainJobFailed,
    TrainJobLauncher,
    TrainJobTimeout,
    build_pytorchjob,
    build_trainjob,
    gpu_pool_from_env,
    job_name,
)

NS = "medsight"


def make_job(**kw: Any) -> MultiNodeJob:
    defaults: dict[str, Any] = dict(
        name="ms-instruct-tune-run42",
        image="registry.example.com/medsight/medsight:0.1.0",
        invocation=StageInvocation(
            stage="instruct-tune",
            out="/workspace/out",
            inputs={"data": "/workspace/in/data", "base": "/workspace/in/base"},
            overrides={"instruct_tune.epochs": "3"},
        ),
        num_nodes=4,
        gpus_per_node=8,
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        priority_class="medsight-gpu-training",
    )
    defaults.update(kw)
    return MultiNodeJob(**defaults)


# --- builders ------------------------------------------------------------------------------


def test_stage_invocation_argv() -> None:
    argv = make_job().invocation.argv()
    assert argv == [
        "medsight", "stage", "run", "instruct-tune", "--out", "/workspace/out",
        "--input", "base=/workspace/in/base", "--input", "data=/workspace/in/data",
        "--preset", "full", "--set", "instruct_tune.epochs=3",
    ]


def test_trainjob_object() -> None:
    body = build_trainjob(make_job())
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    spec = body["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed", "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
    }
    trainer = spec["trainer"]
    assert trainer["image"] == "registry.example.com/medsight/medsight:0.1.0"
    assert trainer["command"][:6] == ["torchrun", "--no-python", "medsight", "stage", "run", "instruct-tune"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "medsight-s3-credentials", "key": "AWS_SECRET_ACCESS_KEY",
    }
    [override] = spec["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    pod = override["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    # Rendezvous is the operator's job: nothing in the object may set it.
    dumped = json.dumps(body)
    for reserved in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "PET_"):
        assert reserved not in dumped


def test_pytorchjob_object_and_pod_template_is_valid_core_pod() -> None:
    body = build_pytorchjob(make_job())
    assert body["apiVersion"] == "kubeflow.org/v1" and body["kind"] == "PyTorchJob"
    spec = body["spec"]
    assert spec["nprocPerNode"] == "8"
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    pod = replicas["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"
    assert container["command"][:3] == ["torchrun", "--no-python", "medsight"]
    assert pod["priorityClassName"] == "medsight-gpu-training"
    assert pod["securityContext"]["runAsUser"] == 10001
    # The template is a plain PodSpec: validate it strictly as one.
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"}, "spec": pod}, "1.32.0", strict=True
    )
    single = build_pytorchjob(make_job(num_nodes=1))
    assert set(single["spec"]["pytorchReplicaSpecs"]) == {"Master"}


@pytest.mark.parametrize("name", ["MASTER_ADDR", "WORLD_SIZE", "PET_NNODES", "RANK"])
def test_reserved_env_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"env {name} is set by the operator"):
        make_job(env={name: "x"})
    with pytest.raises(ValueError, match=name):
        make_job(secret_env=[SecretEnv(name, "s", "k")])


def test_names_and_sizes_validated() -> None:
    name = job_name("instruct-tune", "0f3c9a1e-5b7d-4c2a-9e8f-1234567890ab")
    assert len(name) <= 45 and name.startswith("ms-instruct-tune-")
    make_job(name=name)
    assert job_name("T2V_Align", "RUN.1") == "ms-t2v-align-run-1"
    with pytest.raises(ValueError, match="RFC 1035"):
        make_job(name="Bad_Name")
    with pytest.raises(ValueError, match="num_nodes"):
        make_job(num_nodes=0)


def test_gpu_pool_from_platform_configmap_env() -> None:
    selector, tolerations = gpu_pool_from_env(
        {
            "MEDSIGHT_GPU_NODE_LABEL_KEY": "example.org/pool",
            "MEDSIGHT_GPU_NODE_LABEL_VALUE": "h100",
            "MEDSIGHT_GPU_TAINT_KEY": "example.org/gpu",
        }
    )
    assert selector == {"example.org/pool": "h100"}
    assert tolerations == [{"key": "example.org/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert gpu_pool_from_env({}) == ({}, [])


# --- launcher ------------------------------------------------------------------------------


def cond(type_: str, status: str = "True", reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


class FakeCustomObjectsApi:
    """Records calls; `get` returns scripted objects (the last one repeats) or raises them."""

    def __init__(self, statuses: list[Any] | None = None, create_errors: list[ApiException] | None = None):
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.statuses = list(statuses or [{"status": {}}])
        self.create_errors = list(create_errors or [])
        self.deleted = False

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):  # type: ignore[no-untyped-def]
        self.calls.append(("create", dict(group=group, version=version, namespace=namespace, plural=plural, body=body)))
        if self.create_errors:
            raise self.create_errors.pop(0)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):  # type: ignore[no-untyped-def]
        self.calls.append(("get", dict(group=group, plural=plural, name=name)))
        if self.deleted:
            raise ApiException(status=404)
        item = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(item, BaseException):
            raise item
        return item

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):  # type: ignore[no-untyped-def]
        self.calls.append(("delete", dict(group=group, plural=plural, name=name, **kw)))
        if self.deleted:
            raise ApiException(status=404)
        self.deleted = True

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def launcher(api: Any, kind: Any = TRAINJOB, **kw: Any) -> tuple[TrainJobLauncher, FakeClock]:
    clock = FakeClock()
    return TrainJobLauncher(api, NS, kind=kind, poll_interval_s=10, clock=clock, sleep=clock.sleep, **kw), clock


def test_create_and_wait_until_complete() -> None:
    api = FakeCustomObjectsApi(
        [
            {"status": {}},
            {"status": {"conditions": [cond("Created")]}},
            {"status": {"conditions": [cond("Created"), cond("Complete", reason="JobsCompleted", message="done")]}},
        ]
    )
    runner, clock = launcher(api)
    body = build_trainjob(make_job())
    outcome = runner.run(body, timeout_s=3600)
    create = api.calls[0][1]
    assert (create["group"], create["version"], create["namespace"], create["plural"]) == (
        "trainer.kubeflow.org", "v1alpha1", NS, "trainjobs",
    )
    assert create["body"] is body
    assert outcome.reason == "JobsCompleted" and outcome.message == "done"
    assert outcome.elapsed_s == 20 and clock.sleeps == [10, 10]
    assert "delete" not in api.names()


def test_failure_surfaces_reason_and_redacted_logs() -> None:
    leaked = "hunter2" + "hunter2"
    pods = SimpleNamespace(
        items=[
            SimpleNamespace(metadata=SimpleNamespace(name="ms-x-node-0-0"), status=SimpleNamespace(phase="Failed")),
            SimpleNamespace(metadata=SimpleNamespace(name="ms-x-node-0-1"), status=SimpleNamespace(phase="Succeeded")),
        ]
    )
    core = SimpleNamespace(
        list_namespaced_pod=lambda ns, label_selector: pods,
        read_namespaced_pod_log=lambda name, ns, tail_lines: f"CUDA OOM\npassword={leaked}\n",
    )
    api = FakeCustomObjectsApi([{"status": {"conditions": [cond("Failed", reason="BackoffLimitExceeded", message="rank 3 exited 1")]}}])
    runner, _ = launcher(api, core_api=core)
    with pytest.raises(TrainJobFailed) as info:
        runner.run(build_trainjob(make_job()), timeout_s=60)
    err = info.value
    assert (err.reason, err.message) == ("BackoffLimitExceeded", "rank 3 exited 1")
    assert "TrainJob ms-instruct-tune-run42 failed" in str(err)
    assert "CUDA OOM" in err.logs and "ms-x-node-0-0" in err.logs and "ms-x-node-0-1" not in err.logs
    assert leaked not in str(err)
    assert "delete" not in api.names(), "failed jobs are kept for inspection"


def test_pytorchjob_kind_uses_its_conditions() -> None:
    api = FakeCustomObjectsApi([{"status": {"conditions": [cond("Running"), cond("Succeeded", reason="PyTorchJobSucceeded")]}}])
    runner, _ = launcher(api, kind=PYTORCHJOB)
    outcome = runner.run(build_pytorchjob(make_job()), timeout_s=60)
    assert outcome.kind == "PyTorchJob" and outcome.reason == "PyTorchJobSucceeded"
    assert api.calls[0][1]["plural"] == "pytorchjobs" and api.calls[0][1]["group"] == "kubeflow.org"
    with pytest.raises(ValueError, match="launcher expects kubeflow.org/v1/PyTorchJob"):
        runner.create(build_trainjob(make_job()))


def test_false_conditions_are_not_terminal_and_timeout_deletes() -> None:
    api = FakeCustomObjectsApi([{"status": {"conditions": [cond("Complete", status="False"), cond("Failed", status="False")]}}])
    runner, clock = launcher(api)
    with pytest.raises(TrainJobTimeout, match="did not finish within 35 s"):
        runner.run(build_trainjob(make_job()), timeout_s=35)
    assert clock.now == 35 and clock.sleeps == [10, 10, 10, 5]
    delete = [c for c in api.calls if c[0] == "delete"]
    assert delete and delete[0][1]["propagation_policy"] == "Foreground"


def test_keyboard_interrupt_cancels_and_deletes() -> None:
    api = FakeCustomObjectsApi([{"status": {}}])
    runner, _ = launcher(api)

    def interrupted(_: float) -> None:
        raise KeyboardInterrupt

    runner.sleep = interrupted
    with pytest.raises(KeyboardInterrupt):
        runner.run(build_trainjob(make_job()), timeout_s=600)
    assert api.names()[-1] == "delete"


def test_sigterm_from_kfp_cancels_and_deletes() -> None:
    api = FakeCustomObjectsApi([{"status": {}}])
    runner, _ = launcher(api)
    runner.sleep = lambda _: os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainJobCancelled, match="signal"):
        runner.run(build_trainjob(make_job()), timeout_s=600)
    assert api.names()[-1] == "delete"
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler is restored"


def test_transient_api_errors_are_retried_then_give_up() -> None:
    done = {"status": {"conditions": [cond("Complete")]}}
    api = FakeCustomObjectsApi([ApiException(status=503), ApiException(status=500), done])
    runner, _ = launcher(api)
    assert runner.wait("ms-x", timeout_s=600).name == "ms-x"

    api = FakeCustomObjectsApi([ApiException(status=503)])
    runner, _ = launcher(api, max_api_errors=3)
    with pytest.raises(TrainJobError, match="3 API errors in a row"):
        runner.wait("ms-x", timeout_s=600)

    api = FakeCustomObjectsApi([ApiException(status=403)])
    runner, _ = launcher(api)
    with pytest.raises(ApiException):
        runner.wait("ms-x", timeout_s=600)


def test_job_deleted_externally_is_a_cancellation() -> None:
    api = FakeCustomObjectsApi([ApiException(status=404)])
    runner, _ = launcher(api)
    with pytest.raises(TrainJobCancelled, match="deleted while waiting"):
        runner.wait("ms-x", timeout_s=600)


def test_conflict_adopts_running_job() -> None:
    running = {"status": {"conditions": [cond("Created")]}}
    done = {"status": {"conditions": [cond("Complete")]}}
    api = FakeCustomObjectsApi([running, done], create_errors=[ApiException(status=409)])
    runner, _ = launcher(api)
    runner.run(build_trainjob(make_job()), timeout_s=600)
    assert api.names().count("create") == 1 and "delete" not in api.names()


def test_conflict_with_finished_job_replaces_it() -> None:
    failed = {"status": {"conditions": [cond("Failed")]}}
    api = FakeCustomObjectsApi([failed], create_errors=[ApiException(status=409)])
    runner, _ = launcher(api)
    name = runner.create(build_trainjob(make_job()))
    assert name == "ms-instruct-tune-run42"
    assert api.names() == ["create", "get", "delete", "get", "create"]


def test_forbidden_names_the_role() -> None:
    api = FakeCustomObjectsApi(create_errors=[ApiException(status=403)])
    runner, _ = launcher(api)
    with pytest.raises(TrainJobError, match="medsight-job-launcher Role"):
        runner.create(build_trainjob(make_job()))


def test_delete_missing_job_is_not_an_error() -> None:
    api = FakeCustomObjectsApi()
    api.deleted = True
    runner, _ = launcher(api)
    assert runner.delete("ms-x") is False
