"""Kustomize base + overlays: render offline, validate strictly, check security and scheduling."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsight.platform.secret_scan import scan_k8s_secrets, scan_text

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
TARGETS = {
    "base": MANIFESTS / "base",
    "dev": MANIFESTS / "overlays" / "dev",
    "h100": MANIFESTS / "overlays" / "h100",
}
# Validate against the kubectl minor installed here and the newest schema kubernetes-validate
# ships, so both an older production cluster and a current one accept the objects.
KUBE_VERSIONS = ("1.32.0", "1.37.0")
CRD_KINDS = {"TrainingRuntime"}  # no schema in kubernetes-validate: warned about, not validated
NAMESPACE = "medsight"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
SENSITIVE_ENV = re.compile(r"(?i)(password|secret|token|access_key)")

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


@lru_cache(maxsize=None)
def _render(path: Path) -> str:
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, f"kubectl kustomize {path}:\n{proc.stderr}"
    return proc.stdout


def render(target: str) -> tuple[str, list[dict[str, Any]]]:
    text = _render(TARGETS[target])
    return text, [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, pod spec) for every pod template, including the TrainingRuntime's."""
    for doc in docs:
        label = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in WORKLOAD_KINDS:
            yield label, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "TrainingRuntime":
            for job in doc["spec"]["template"]["spec"]["replicatedJobs"]:
                yield f"{label}/{job['name']}", job["template"]["spec"]["template"]["spec"]


_UNITS = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


@pytest.mark.parametrize("target", TARGETS)
def test_strict_schema_validation(target: str, tmp_path: Path) -> None:
    text, docs = render(target)
    rendered = tmp_path / f"{target}.yaml"
    rendered.write_text(text)
    args = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    for version in KUBE_VERSIONS:
        args += ["-k", version]
    proc = subprocess.run([*args, str(rendered)], capture_output=True, text=True)
    assert proc.returncode == 0, f"kubernetes-validate {target}:\n{proc.stdout}{proc.stderr}"
    warned = set(re.findall(r"schema for kind (\w+)", proc.stdout))
    assert warned <= CRD_KINDS, f"{target}: core kinds left unvalidated: {warned - CRD_KINDS}"
    assert {d["kind"] for d in docs} - CRD_KINDS, "nothing was validated"


@pytest.mark.parametrize("target", TARGETS)
def test_everything_namespaced_in_medsight(target: str) -> None:
    _, docs = render(target)
    cluster_scoped = {"Namespace", "PriorityClass"}
    for doc in docs:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_non_root_read_only_with_resources(target: str) -> None:
    _, docs = render(target)
    specs = list(pod_specs(docs))
    assert specs
    for label, spec in specs:
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, f"{label}: runAsNonRoot"
        assert pod_sc.get("runAsUser", 0) > 0, f"{label}: runAsUser must be a non-zero UID"
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", label
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{label}/{container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    assert res in resources.get(part, {}), f"{where}: resources.{part}.{res}"


@pytest.mark.parametrize("target", TARGETS)
def test_no_literal_secret_values(target: str) -> None:
    text, docs = render(target)
    assert scan_text(text, f"kustomize {target}") == []
    assert scan_k8s_secrets(docs, f"kustomize {target}") == []
    for label, spec in pod_specs(docs):
        for container in spec["containers"]:
            for env in container.get("env", []):
                if SENSITIVE_ENV.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (
                        f"{label}/{container['name']}: env {env['name']} must come from a Secret"
                    )


def test_dev_secret_is_placeholder_and_h100_creates_none() -> None:
    _, dev = render("dev")
    secret = one(dev, "Secret", "medsight-s3-credentials")  # unhashed: pipelines use the name
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    _, h100 = render("h100")
    assert by_kind(h100, "Secret") == [], "h100 must not render credentials; create them in-cluster"


def test_rbac_lets_the_runner_launch_jobs() -> None:
    _, docs = render("base")
    role = one(docs, "Role", "medsight-job-launcher")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    needed = {"create", "get", "watch", "delete"}
    assert needed <= granted[("trainer.kubeflow.org", "trainjobs")]
    assert needed <= granted[("kubeflow.org", "pytorchjobs")]
    assert {"get", "list"} <= granted[("", "pods")]
    assert "get" in granted[("", "pods/log")]
    assert all("*" not in verbs for verbs in granted.values()), "no wildcard verbs"
    binding = one(docs, "RoleBinding", "medsight-job-launcher")
    assert binding["roleRef"]["name"] == "medsight-job-launcher"
    assert {"kind": "ServiceAccount", "name": "medsight-pipeline-runner", "namespace": NAMESPACE} in binding["subjects"]
    one(docs, "ServiceAccount", "medsight-pipeline-runner")
    assert one(docs, "ServiceAccount", "medsight-workload")["automountServiceAccountToken"] is False


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_minio_statefulset_with_pvc_and_secret_credentials() -> None:
    _, docs = render("base")
    sts = one(docs, "StatefulSet", "minio")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    env = _env(sts["spec"]["template"]["spec"]["containers"][0])
    for name in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "medsight-s3-credentials"
    assert one(docs, "Service", "minio")["spec"]["ports"][0]["port"] == 9000


def test_mlflow_sqlite_on_pvc_and_artifacts_on_minio() -> None:
    _, docs = render("base")
    config = one(docs, "ConfigMap", "medsight-platform")["data"]
    deploy = one(docs, "Deployment", "mlflow")
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    store = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert store.startswith("sqlite:////")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert store.removeprefix("sqlite:///").startswith(mounts["data"] + "/")
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    one(docs, "PersistentVolumeClaim", claims["data"])
    key = env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]["configMapKeyRef"]["key"]
    assert config[key].startswith("s3://")
    endpoint_key = env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["key"]
    assert config[endpoint_key] == "http://minio:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "medsight-s3-credentials"
    assert deploy["spec"]["strategy"]["type"] == "Recreate"  # single sqlite writer
    assert one(docs, "Service", "mlflow")["spec"]["ports"][0]["port"] == 5000


def test_mlflow_postgres_component(tmp_path: Path) -> None:
    overlay = tmp_path / "pg"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                # kustomize refuses absolute paths.
                "resources": [os.path.relpath(TARGETS["h100"], overlay)],
                "components": [os.path.relpath(MANIFESTS / "components" / "mlflow-postgres", overlay)],
            }
        )
    )
    docs = [d for d in yaml.safe_load_all(_render(overlay)) if d]
    env = _env(one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0])
    store = env["MLFLOW_BACKEND_STORE_URI"]
    assert "value" not in store
    assert store["valueFrom"]["secretKeyRef"] == {"name": "medsight-mlflow-db", "key": "MLFLOW_BACKEND_STORE_URI"}


def test_h100_gpu_priority_quota_and_runtime() -> None:
    _, docs = render("h100")
    priority = one(docs, "PriorityClass", "medsight-gpu-training")
    assert priority["value"] > 0 and priority["globalDefault"] is False
    quota = one(docs, "ResourceQuota", "medsight-compute")
    assert int(quota["spec"]["hard"]["requests.nvidia.com/gpu"]) >= 8
    config = one(docs, "ConfigMap", "medsight-platform")["data"]
    assert config["MEDSIGHT_GPU_PRIORITY_CLASS"] == "medsight-gpu-training"

    runtime = one(docs, "TrainingRuntime", "medsight-torch")
    [(_, spec)] = list(pod_specs([runtime]))
    assert spec["priorityClassName"] == "medsight-gpu-training"
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expr = term["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert (expr["key"], expr["values"]) == (
        config["MEDSIGHT_GPU_NODE_LABEL_KEY"],
        [config["MEDSIGHT_GPU_NODE_LABEL_VALUE"]],
    )
    assert spec["tolerations"] == [
        {"key": config["MEDSIGHT_GPU_TAINT_KEY"], "operator": "Exists", "effect": "NoSchedule"}
    ]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    container = spec["containers"][0]
    assert container["name"] == "node"  # the Trainer's torch plugin targets this name
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == config["MEDSIGHT_GPUS_PER_NODE"]
    assert "REPLACED_BY_KUSTOMIZE" not in yaml.safe_dump(runtime)


def test_h100_node_pool_label_is_configurable(tmp_path: Path) -> None:
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    pool = copy / "overlays" / "h100" / "gpu-pool.env"
    text = pool.read_text()
    text = re.sub(r"(?m)^MEDSIGHT_GPU_NODE_LABEL_KEY=.*$", "MEDSIGHT_GPU_NODE_LABEL_KEY=example.org/pool", text)
    text = re.sub(r"(?m)^MEDSIGHT_GPU_NODE_LABEL_VALUE=.*$", "MEDSIGHT_GPU_NODE_LABEL_VALUE=h100-a", text)
    text = re.sub(r"(?m)^MEDSIGHT_GPU_TAINT_KEY=.*$", "MEDSIGHT_GPU_TAINT_KEY=example.org/gpu-only", text)
    pool.write_text(text)
    docs = [d for d in yaml.safe_load_all(_render(copy / "overlays" / "h100")) if d]
    [(_, spec)] = list(pod_specs([one(docs, "TrainingRuntime", "medsight-torch")]))
    expr = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"][0]
    assert (expr["key"], expr["values"]) == ("example.org/pool", ["h100-a"])
    assert spec["tolerations"][0]["key"] == "example.org/gpu-only"
    assert one(docs, "ConfigMap", "medsight-platform")["data"]["MEDSIGHT_GPU_NODE_LABEL_KEY"] == "example.org/pool"


def _limit(docs: list[dict[str, Any]], kind: str, name: str, resource: str) -> float:
    container = one(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]
    return quantity(container["resources"]["limits"][resource])


def test_dev_is_smaller_than_h100() -> None:
    _, dev = render("dev")
    _, h100 = render("h100")
    for kind, name in (("StatefulSet", "minio"), ("Deployment", "mlflow")):
        for resource in ("cpu", "memory"):
            assert _limit(dev, kind, name, resource) < _limit(h100, kind, name, resource), (kind, name, resource)

    def storage(docs: list[dict[str, Any]]) -> float:
        sts = one(docs, "StatefulSet", "minio")
        return quantity(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])

    assert storage(dev) < storage(h100)
    dev_quota = one(dev, "ResourceQuota", "medsight-compute")["spec"]["hard"]
    assert "requests.nvidia.com/gpu" not in dev_quota
    assert quantity(dev_quota["requests.cpu"]) < quantity(
        one(h100, "ResourceQuota", "medsight-compute")["spec"]["hard"]["requests.cpu"]
    )
