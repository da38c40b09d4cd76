"""The KServe InferenceService in manifests/serving: renders, validates, runs hardened."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medsight.platform.secret_scan import scan_text

ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "manifests" / "serving"
OVERLAYS = ("gpu", "cpu")
KUBE_VERSIONS = ("1.32.0", "1.37.0")

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def render(overlay: str) -> tuple[str, list[dict]]:
    proc = subprocess.run(["kubectl", "kustomize", str(SERVING / "overlays" / overlay)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, [d for d in yaml.safe_load_all(proc.stdout) if d]


def service(docs: list[dict]) -> dict:
    [found] = [d for d in docs if d["kind"] == "InferenceService"]
    return found


def validate(text: str, tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(text)
    args = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    for version in KUBE_VERSIONS:
        args += ["-k", version]
    proc = subprocess.run([*args, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # kubernetes-validate has no schema for KServe's CRD: it may only warn about that kind.
    assert set(re.findall(r"schema for kind (\w+)", proc.stdout)) <= {"InferenceService"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_and_validates(overlay: str, tmp_path: Path) -> None:
    text, docs = render(overlay)
    validate(text, tmp_path)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "InferenceService"}
    assert all(d["metadata"]["namespace"] == "medsight" for d in docs)
    assert scan_text(text, f"serving/{overlay}") == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_predictor_from_the_platform_image_with_storage_uri(overlay: str) -> None:
    _, docs = render(overlay)
    isvc = service(docs)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    [container] = predictor["containers"]
    expected_image = "registry.example.com/medsight/medsight" + ("-cpu" if overlay == "cpu" else "") + ":0.1.0"
    assert container["image"] == expected_image  # the training image, not a separate server image
    assert container["command"] == ["medsight", "serve"]
    args = container["args"]
    assert args[args.index("--model") + 1] == "/mnt/models"  # where KServe's storage initializer puts it
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--device") + 1] == ("cuda" if overlay == "gpu" else "cpu")
    env = {e["name"]: e for e in container["env"]}
    assert env["STORAGE_URI"]["value"].startswith("s3://medsight-mlflow/")
    token = env["MEDSIGHT_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["optional"] is True and "value" not in env["MEDSIGHT_SERVE_TOKEN"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert predictor["serviceAccountName"] == account["metadata"]["name"]
    assert {"name": "medsight-s3-credentials"} in account["secrets"]
    assert account["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] == "minio:9000"
    limits = container["resources"]["limits"]
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == "1"
        assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in predictor


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_predictor_runs_non_root_read_only(overlay: str) -> None:
    predictor = service(render(overlay)[1])["spec"]["predictor"]
    pod = predictor["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["seccompProfile"]["type"] == "RuntimeDefault"
    for container in predictor["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][part])
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # writable scratch


def test_deploy_fills_in_the_registered_version(tmp_path: Path) -> None:
    from medsight.platform.deploy import render_inference_service
    from medsight.platform.model_registry import RegistryError

    uri = "s3://medsight-mlflow/artifacts/1/models/m-0123/artifacts"
    text = render_inference_service(SERVING / "overlays" / "gpu", uri, model_name="medsight", version="7", service_name="medsight-v7")
    validate(text, tmp_path)
    isvc = service([d for d in yaml.safe_load_all(text) if d])
    assert isvc["metadata"]["name"] == "medsight-v7"
    assert isvc["metadata"]["labels"]["medsight.io/model-version"] == "7"
    assert isvc["metadata"]["annotations"]["medsight.io/registered-model"] == "models:/medsight/7"
    env = {e["name"]: e for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"]["value"] == uri
    with pytest.raises(RegistryError, match="DNS label"):
        render_inference_service(SERVING / "overlays" / "gpu", uri, model_name="m", version="1", service_name="Bad_Name")
    with pytest.raises(RegistryError, match="no kustomization.yaml"):
        render_inference_service(tmp_path, uri, model_name="m", version="1")
