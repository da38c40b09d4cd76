"""The MLflow model registry for trained MedSIGHT models: log, gate, register, list, promote.

A registered version is a model package (``medsight.serve.package``) logged as an MLflow pyfunc
model, so it is self-contained: serving it needs the registry entry and nothing else. Its
version tags carry the lineage (``kfp.run_id``, ``git.commit``, ``dvc.<name>`` for every input and
checkpoint, ``eval.<metric>`` for the evaluation summary) and the thresholds it passed
(``gate.<metric>``). Promotion uses MLflow 3 aliases (``production``, ``staging``...), not stages.

Entry points for other code:
- ``log_model_package``: log a built package as an MLflow model (``final_model.log_final_model`` builds it).
- ``register_from_evaluation``: the pipeline step after ``evaluate`` (gate on thresholds, log,
  register with lineage).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsight.platform.model_lineage import (  # noqa: F401 - re-exported for callers of the registry
    SUMMARY_METRICS,
    GateResult,
    RegistryError,
    check_thresholds,
    collect_lineage,
    dvc_hash,
    lineage_tags,
    parse_thresholds,
    upstream_outputs,
)
from medsight.platform.tracking import DEFAULT_EXPERIMENT, TrackingError, default_artifact_location, resolve_tracking_uri

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_MODEL_NAME = "medsight"
MODEL_ARTIFACT = "model"
_ALIAS_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


@dataclass(frozen=True)
class LoggedModel:
    run_id: str
    model_uri: str  # models:/m-... (MLflow 3 logged model)
    artifact_uri: str  # where its files are (file://, s3://, mlflow-artifacts:/)


@dataclass(frozen=True)
class Registration:
    gate: GateResult
    name: str
    version: str | None = None  # None when the gate refused
    run_id: str | None = None
    model_uri: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def registered(self) -> bool:
        return self.version is not None


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str
    source: str
    created: int  # ms since epoch
    description: str

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


# ---------------------------------------------------------------------- MLflow plumbing


@contextmanager
def _mlflow_at(tracking_uri: str) -> Iterator[Any]:
    """MLflow's fluent API (log_model needs it) pointed at ``tracking_uri`` for one block only."""
    import mlflow

    previous_tracking, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_registry)


def _uri(tracking_uri: str | None) -> str:
    uri = resolve_tracking_uri(None, tracking_uri)
    if not uri:
        raise RegistryError("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI (e.g. sqlite:///runs/mlflow.db)")
    return uri


def client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    uri = _uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(mlflow_client, name: str, tracking_uri: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))
    except Exception:  # created concurrently by another process
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "transformers", "tokenizers", "safetensors", "open_clip_torch", "pydicom", "pillow", "mlflow", "kserve"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def log_model_package(
    package_dir: Path,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str = "model-package",
    tags: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    run_id: str | None = None,
) -> LoggedModel:
    """Log a built package as an MLflow pyfunc model: in run ``run_id`` (the evaluation's, which
    then lists it among its outputs), or in a new run of ``experiment``."""
    from medsight.platform.tracking import _metric_key
    from medsight.serve import mlflow_model_code
    from medsight.serve.mlflow_pyfunc import PACKAGE_ARTIFACT
    from medsight.serve.package import verify_package

    verify_package(package_dir)
    uri = _uri(tracking_uri)
    mlflow_client = client(uri)
    try:
        experiment_id = _experiment_id(mlflow_client, experiment, uri)
    except Exception as error:
        raise TrackingError(f"MLflow at {uri} is not usable: {error}") from error
    run_args = {"run_id": run_id} if run_id else {"experiment_id": experiment_id, "run_name": run_name, "tags": dict(tags or {})}
    with _mlflow_at(uri) as mlflow, mlflow.start_run(**run_args) as run:
        if metrics:
            mlflow.log_metrics({_metric_key(k): float(v) for k, v in metrics.items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "add type hints to predict": not wanted here
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=mlflow_model_code.__file__,
                artifacts={PACKAGE_ARTIFACT: str(package_dir)},
                pip_requirements=_pip_requirements(),
                tags=dict(tags or {}),
            )
    # Logged inside the run, the model is already among the run's outputs (MLflow links it).
    return LoggedModel(run.info.run_id, info.model_uri, info.artifact_path)


def register_from_evaluation(
    evaluate_dir: Path,
    model_dir: Path,
    base_dir: Path,
    thresholds: Mapping[str, float],
    lineage: Mapping[str, Any] | None = None,
    *,
    name: str = DEFAULT_MODEL_NAME,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    alias: str | None = None,
    workdir: Path | None = None,
) -> Registration:
    """The pipeline step after ``evaluate``: register the model if it clears ``thresholds``.

    Reads ``evaluate_dir/metrics.json``; a metric below its threshold leaves the registry
    untouched and returns ``registered == False`` with the reasons. Otherwise the model is
    packaged, logged and registered as a new version of ``name`` whose tags carry the lineage.
    """
    from medsight.io_utils import read_json

    metrics = read_json(Path(evaluate_dir) / "metrics.json", RegistryError, "no metrics.json; pass an evaluate stage output")
    gate = check_thresholds(metrics, thresholds)
    if not gate.passed:
        return Registration(gate, name)
    full_lineage = collect_lineage(evaluate_dir, model_dir, base_dir, lineage)
    full_lineage["evaluation"] = {k: float(metrics[k]) for k in SUMMARY_METRICS if k in metrics}
    full_lineage["thresholds"] = dict(thresholds)
    from medsight.platform.final_model import log_final_model

    logged = log_final_model(model_dir, base_dir, tracking_uri=tracking_uri, experiment=experiment,
                             lineage=full_lineage, metrics=metrics, name=name, workdir=workdir)
    tags = lineage_tags(full_lineage, metrics, gate)
    uri = _uri(tracking_uri)
    with _mlflow_at(uri) as mlflow:
        version = mlflow.register_model(logged.model_uri, name, tags=tags)
    mlflow_client = client(uri)
    mlflow_client.update_model_version(name, version.version, description=f"Passed {gate.summary()}. Lineage in tags and package lineage.json.")
    if alias:
        promote(name, version.version, alias, tracking_uri=uri)
    return Registration(gate, name, str(version.version), logged.run_id, logged.model_uri, tags)


# ---------------------------------------------------------------------- reading and moving versions


def _info(version) -> VersionInfo:
    return VersionInfo(
        name=version.name,
        version=str(version.version),
        aliases=sorted(getattr(version, "aliases", []) or []),
        tags=dict(version.tags or {}),
        run_id=version.run_id or "",
        source=version.source or "",
        created=int(version.creation_timestamp or 0),
        description=version.description or "",
    )


def list_versions(name: str | None = None, *, tracking_uri: str | None = None) -> list[VersionInfo]:
    """Every version (of ``name``, or of every registered model), newest first."""
    mlflow_client = client(tracking_uri)
    names = [name] if name else [m.name for m in mlflow_client.search_registered_models()]
    found = []
    for model in names:
        registered = _registered_model(mlflow_client, model)  # raises with the known names
        # Version search results carry no aliases; the registered model holds them.
        aliases: dict[str, list[str]] = {}
        for alias, version in (getattr(registered, "aliases", None) or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in mlflow_client.search_model_versions(f"name = '{model}'"):
            info = _info(version)
            found.append(VersionInfo(**{**info.__dict__, "aliases": sorted(set(info.aliases) | set(aliases.get(info.version, [])))}))
    return sorted(found, key=lambda v: (v.name, -int(v.version)))


def _registered_model(mlflow_client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(sorted(m.name for m in mlflow_client.search_registered_models())) or "none"
        raise RegistryError(f"no registered model {name!r} (registered: {known})") from None


def show_version(name: str, version: str, *, tracking_uri: str | None = None) -> VersionInfo:
    """``version`` is a number or an alias (``production``)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    _registered_model(mlflow_client, name)
    try:
        found = mlflow_client.get_model_version(name, version) if str(version).isdigit() else mlflow_client.get_model_version_by_alias(name, version)
    except MlflowException:
        raise RegistryError(f"model {name!r} has no version or alias {version!r}; see `medsight registry list --name {name}`") from None
    return _info(found)


def check_alias(alias: str) -> None:
    if not alias or set(alias) - _ALIAS_CHARS or alias[0].isdigit() or alias == "latest":
        raise RegistryError(f"alias {alias!r}: use lowercase letters, digits, '_' or '-', not starting with a digit (and not 'latest')")


def promote(name: str, version: str, alias: str = "production", *, tracking_uri: str | None = None) -> str | None:
    """Point ``alias`` at ``version``; returns the version it pointed at before (or None)."""
    check_alias(alias)
    target = show_version(name, version, tracking_uri=tracking_uri)
    mlflow_client = client(tracking_uri)
    try:
        previous = mlflow_client.get_model_version_by_alias(name, alias).version
    except Exception:
        previous = None
    mlflow_client.set_registered_model_alias(name, alias, target.version)
    return None if previous is None else str(previous)


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/name/3`` or ``models:/name@production`` -> (name, version or alias)."""
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, _, ref = body.partition("@")
    else:
        name, _, ref = body.rpartition("/")
    if not name or not ref or "/" in name:
        raise RegistryError(f"{uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, ref


def download_uri(name: str, version: str, *, tracking_uri: str | None = None) -> str:
    """Where the registered version's files are (file://, s3:// or mlflow-artifacts:/)."""
    info = show_version(name, version, tracking_uri=tracking_uri)
    return client(tracking_uri).get_model_version_download_uri(name, info.version)


def download_model(uri: str, destination: Path | None = None, *, tracking_uri: str | None = None) -> Path:
    """Fetch a registered version (``models:/name/version`` or ``@alias``); returns the folder."""
    import mlflow.artifacts

    name, ref = parse_model_uri(uri)
    info = show_version(name, ref, tracking_uri=tracking_uri)
    from medsight.io_utils import atomic_directory

    target = Path(destination or tempfile.mkdtemp(prefix="medsight-model-")) / f"{name}-v{info.version}"
    if target.is_dir():
        return target  # complete (written atomically) and versions are immutable
    tracking = _uri(tracking_uri)
    with _mlflow_at(tracking), atomic_directory(target) as tmp:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{info.version}", dst_path=str(tmp), tracking_uri=tracking)
    return target
