"""Deploy a registered model version as a KServe InferenceService.

The InferenceService of ``manifests/serving/overlays/<gpu|cpu>`` is rendered with kustomize and
pointed at the version's files in the registry's S3 store (``STORAGE_URI``); KServe's storage
initializer copies them into the pod. A registry behind an MLflow server with proxied
artifacts reports ``mlflow-artifacts:/...`` locations: ``--artifacts-destination`` (the
server's own ``--artifacts-destination``, ``MEDSIGHT_MLFLOW_ARTIFACTS_URI`` in the platform
ConfigMap) maps them back to ``s3://``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from medsight.platform.model_registry import RegistryError, download_uri, show_version

OVERLAYS = ("gpu", "cpu")
ARTIFACTS_ENV = "MEDSIGHT_MLFLOW_ARTIFACTS_URI"
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def storage_uri(name: str, version: str, *, tracking_uri: str | None = None, artifacts_destination: str | None = None) -> str:
    """The s3:// location of a registered version's files, for KServe."""
    return kserve_storage_uri(download_uri(name, version, tracking_uri=tracking_uri), artifacts_destination)


def kserve_storage_uri(location: str, artifacts_destination: str | None = None) -> str:
    """An MLflow artifact location -> the s3:// URI KServe's storage initializer reads."""
    if location.startswith("s3://"):
        return location
    if location.startswith("mlflow-artifacts:"):
        if not artifacts_destination or not artifacts_destination.startswith("s3://"):
            raise RegistryError(
                f"{location}: the registry proxies its artifacts; pass --artifacts-destination s3://... "
                f"(the MLflow server's artifact destination, {ARTIFACTS_ENV} in the platform ConfigMap)"
            )
        relative = re.sub(r"^mlflow-artifacts:(//[^/]*)?/*", "", location)
        return f"{artifacts_destination.rstrip('/')}/{relative}"
    raise RegistryError(f"{location}: KServe cannot download from here; log models to an S3 (MinIO) artifact store")


def render_inference_service(
    overlay_dir: Path,
    storage: str,
    *,
    model_name: str,
    version: str,
    service_name: str | None = None,
    image: str | None = None,
) -> str:
    """YAML of the overlay with the InferenceService pointed at ``storage``."""
    if shutil.which("kubectl") is None:
        raise RegistryError("kubectl not found: it renders the kustomize overlay (kubectl kustomize)")
    if not (Path(overlay_dir) / "kustomization.yaml").is_file():
        raise RegistryError(f"{overlay_dir}: no kustomization.yaml; pass --manifests pointing at manifests/serving of a checkout")
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay_dir)], capture_output=True, text=True)
    if rendered.returncode != 0:
        raise RegistryError(f"kubectl kustomize {overlay_dir} failed: {rendered.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    services = [d for d in docs if d.get("kind") == "InferenceService"]
    if len(services) != 1:
        raise RegistryError(f"{overlay_dir}: expected one InferenceService, rendered {len(services)}")
    service = services[0]
    if service_name:
        if not _DNS_LABEL.match(service_name):
            raise RegistryError(f"--service-name {service_name!r}: must be a DNS label (lowercase letters, digits, '-')")
        service["metadata"]["name"] = service_name
    metadata = service["metadata"]
    metadata.setdefault("labels", {}).update({"medsight.io/model": _label(model_name), "medsight.io/model-version": _label(version)})
    metadata.setdefault("annotations", {}).update({"medsight.io/registered-model": f"models:/{model_name}/{version}"})
    container = service["spec"]["predictor"]["containers"][0]
    env = {e["name"]: e for e in container.setdefault("env", [])}
    if "STORAGE_URI" not in env:
        raise RegistryError(f"{overlay_dir}: the predictor container has no STORAGE_URI env entry to fill in")
    env["STORAGE_URI"]["value"] = storage
    if image:
        container["image"] = image
    return yaml.safe_dump_all(docs, sort_keys=False)


def _label(value: str) -> str:
    """A Kubernetes label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", value)[:63].strip("._-")
    return cleaned or "unknown"


def deploy(
    name: str,
    version: str,
    *,
    overlay: str = "gpu",
    manifests: Path = Path("manifests/serving"),
    tracking_uri: str | None = None,
    artifacts_destination: str | None = None,
    service_name: str | None = None,
    image: str | None = None,
    apply: bool = False,
) -> str:
    """Render (and with ``apply`` also ``kubectl apply``) the InferenceService of a version."""
    if overlay not in OVERLAYS:
        raise RegistryError(f"--overlay {overlay!r}: one of {', '.join(OVERLAYS)}")
    info = show_version(name, version, tracking_uri=tracking_uri)  # resolves an alias to its number
    storage = storage_uri(name, info.version, tracking_uri=tracking_uri, artifacts_destination=artifacts_destination)
    text = render_inference_service(Path(manifests) / "overlays" / overlay, storage, model_name=name, version=info.version,
                                    service_name=service_name, image=image)
    if apply:
        applied = subprocess.run(["kubectl", "apply", "-f", "-"], input=text, capture_output=True, text=True)
        if applied.returncode != 0:
            raise RegistryError(f"kubectl apply failed: {applied.stderr.strip()}")
    return text
