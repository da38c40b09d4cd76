"""MLflow implementation of the ``Tracker`` protocol that training code logs through.

One MLflow run per stage execution, nested under its pipeline run (``mlflow_runs.py``). Params
are the resolved config flattened to dotted keys; metrics keep their steps; tags tie every
number to its code (``mlflow.source.git.commit``), orchestrator run (``kfp.run_id``) and data
(``dvc.<input>`` / ``dvc.output`` md5s, and each input logged as a dataset with its DVC source).
System metrics (CPU, memory, disk, network, GPU) are sampled in a thread while a run is open,
unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is false. The tracking URI comes from an
explicit argument, ``MLFLOW_TRACKING_URI``, or ``config.tracking.uri`` when the config has one;
``sqlite:///path.db`` works with artifacts kept next to the database.
"""

from __future__ import annotations

import atexit
import os
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import medsight
from medsight.platform import mlflow_runs
from medsight.stages.lineage import git_commit, pipeline_run_id  # git_commit re-exported: the code version

# MLflow 3 reports usage to a remote endpoint by default, and its DNS lookup can stall a
# sandboxed or air-gapped pod for minutes. Off unless the user explicitly turns it on; this runs
# before any module here imports mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_EXPERIMENT = "medsight"
ARTIFACTS_ENV = "MEDSIGHT_MLFLOW_ARTIFACTS"
_PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000
SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"  # MLflow's own switch


class TrackingError(RuntimeError):
    """MLflow is misconfigured or unreachable; the message names the URI (never credentials)."""


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists/tuples are kept as one value."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def resolve_tracking_uri(config: Any = None, uri: str | None = None) -> str | None:
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    tracking = getattr(config, "tracking", None)
    return getattr(tracking, "uri", None) or None


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: env override, else beside a sqlite database."""
    if os.environ.get(ARTIFACTS_ENV):
        return Path(os.environ[ARTIFACTS_ENV]).resolve().as_uri()
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None  # a tracking server decides (proxied artifacts on the cluster)


def system_metrics_enabled(default: bool = True) -> bool:
    value = os.environ.get(SYSTEM_METRICS_ENV, "").strip().lower()
    return default if not value else value in ("1", "true", "yes")


def _default_tags(stage: str) -> dict[str, str]:
    tags = {
        "medsight.stage": stage,
        "medsight.version": medsight.__version__,
        "git.commit": git_commit(),
        **mlflow_runs.source_tags("medsight pipeline" if stage == "pipeline" else f"medsight stage run {stage}"),
    }
    if os.environ.get("KFP_RUN_ID"):
        tags["kfp.run_id"] = os.environ["KFP_RUN_ID"]
    if pipeline_run_id():
        tags[mlflow_runs.RUN_TAG] = pipeline_run_id()
    return tags


def run_arguments(stage: str, config: Any = None, *, uri: str | None = None, run_name: str | None = None,
                  tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``MLflowTracker`` arguments of a stage's run (URI, experiment, name, tags), resolved from
    the environment and the config without importing MLflow."""
    tracking_uri = resolve_tracking_uri(config, uri)
    if not tracking_uri:
        raise TrackingError(
            "no MLflow tracking URI: set MLFLOW_TRACKING_URI (e.g. sqlite:///runs/mlflow.db) "
            "or config tracking.uri"
        )
    tracking = getattr(config, "tracking", None)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or getattr(tracking, "experiment", None) or DEFAULT_EXPERIMENT
    return {
        "tracking_uri": tracking_uri,
        "run_name": run_name or stage,
        "experiment": experiment,
        "tags": {**_default_tags(stage), "medsight.preset": str(getattr(config, "preset", "")),
                 mlflow_runs.ROLE_TAG: mlflow_runs.PIPELINE_ROLE if stage == "pipeline" else mlflow_runs.STAGE_ROLE,
                 **(tags or {})},
    }


def config_params(config: Any) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, text values."""
    from medsight.config import to_dict

    return {key: str(value) for key, value in flatten(to_dict(config)).items()}


_OPEN: "weakref.WeakSet[MLflowTracker]" = weakref.WeakSet()


@atexit.register
def _finish_open_runs() -> None:
    # Stages and CLIs that never call close() still leave a FINISHED run with all metrics.
    for tracker in list(_OPEN):
        tracker.close()


class MLflowTracker:
    """Tracker backed by ``MlflowClient`` on an explicit run (no global fluent state)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        run_name: str,
        experiment: str = DEFAULT_EXPERIMENT,
        tags: Mapping[str, str] | None = None,
        flush_every: float = 5.0,
        parent: str | None | bool = True,
        system_metrics: bool | None = None,
        pipeline_run_id: str | None = None,
    ) -> None:
        """``parent``: a run id, True to find it (``mlflow_runs.parent_run_id``), or None/False.
        ``system_metrics``: sample CPU/memory/GPU into this run (default: the MLflow env switch).
        ``pipeline_run_id``: track into the parent run of this pipeline run (found or created)
        instead of a new run."""
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        mlflow_runs.prepare_sqlite_store(tracking_uri, default_artifact_location(tracking_uri))
        self.client = MlflowClient(tracking_uri=tracking_uri)
        tags = dict(tags or {})
        parent_id: str | None = None
        try:
            self.experiment_id = self._experiment_id(experiment)
            if pipeline_run_id:
                self.run_id: str = mlflow_runs.find_or_create_parent(self.client, self.experiment_id, pipeline_run_id, tags)
                self.client.update_run(self.run_id, status="RUNNING")
                self.set_tags(tags)
            else:
                parent_id = mlflow_runs.parent_run_id(self.client, self.experiment_id, tags) if parent is True else parent or None
                if parent_id:
                    tags["mlflow.parentRunId"] = parent_id
                self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        except Exception as error:
            raise TrackingError(f"MLflow at {_safe_uri(tracking_uri)} is not usable: {error}") from error
        self.parent_run_id = parent_id
        # On a cluster no runner owns the parent: each stage keeps its status current.
        self._updates_parent = bool(parent_id and parent is True and mlflow_runs.parent_status_is_ours())
        if self._updates_parent:
            mlflow_runs.set_parent_status(self.client, parent_id, "RUNNING")
        self.flush_every = flush_every
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        self._logged_params: dict[str, str] = {}
        self._closed = False
        self._monitor: Any = None
        if system_metrics if system_metrics is not None else system_metrics_enabled():
            self._monitor = _start_system_metrics(self.run_id, tracking_uri)
        _OPEN.add(self)

    @classmethod
    def from_env(
        cls,
        stage: str,
        config: Any = None,
        *,
        uri: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        log_config: bool = True,
        parent: str | None | bool = True,
        system_metrics: bool | None = None,
        pipeline_run_id: str | None = None,
    ) -> MLflowTracker:
        tracker = cls(**run_arguments(stage, config, uri=uri, run_name=run_name, tags=tags), parent=parent,
                      system_metrics=system_metrics, pipeline_run_id=pipeline_run_id)
        if config is not None and log_config:
            tracker.log_params(config_params(config))
        return tracker

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(
                    name, artifact_location=default_artifact_location(self.tracking_uri),
                    tags={mlflow_runs.EXPERIMENT_KIND_TAG: mlflow_runs.MODEL_TRAINING})
            except Exception:
                # Another stage process created it between our lookup and create.
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        mlflow_runs.mark_model_training(self.client, experiment_id)
        return experiment_id

    # -- Tracker protocol ---------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        fresh = []
        for key, value in flatten(params).items():
            text = str(value)[:_PARAM_VALUE_LIMIT]
            # MLflow params are write-once; logging the same key again is a no-op, not an error.
            if self._logged_params.get(key) == text:
                continue
            self._logged_params[key] = text
            fresh.append(Param(key, text))
        for start in range(0, len(fresh), _BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=fresh[start : start + _BATCH_PARAMS])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._pending.append(Metric(_metric_key(key), float(value), now, int(step or 0)))
        # Batched: one sqlite/HTTP round trip per few seconds, not one per training step.
        if len(self._pending) >= _BATCH_METRICS or time.monotonic() - self._last_flush > self.flush_every:
            self.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise TrackingError(f"cannot log artifact {path}: no such file or directory")

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_lineage(self, lineage: Mapping[str, Any]) -> None:
        """Run id, variant and commit as tags; every input as a dataset input with its DVC source."""
        run = lineage.get("run", {})
        self.set_tags({key: value for key, value in {
            "medsight.variant": run.get("variant", ""), "mlflow.source.git.commit": run.get("git_commit", ""),
            **{f"dvc.{name}": entry.get("md5", "") for name, entry in lineage.get("inputs", {}).items()},
        }.items() if value})
        datasets = mlflow_runs.dataset_inputs(lineage, os.environ.get("MEDSIGHT_STORE_URL", ""))
        if datasets:
            self.client.log_inputs(self.run_id, datasets=datasets)

    def log_final_model(self, model_dir: Path, base_dir: Path, lineage: Mapping[str, Any],
                        metrics: Mapping[str, float]) -> None:
        """The evaluated model as an MLflow model owned by this run (``final_model.py``)."""
        from medsight.platform.final_model import log_final_model

        log_final_model(Path(model_dir), Path(base_dir), tracking_uri=self.tracking_uri, run_id=self.run_id,
                        lineage=lineage, metrics=metrics)

    # -- lifecycle -----------------------------------------------------------------------
    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_BATCH_METRICS], self._pending[_BATCH_METRICS:]
            self.client.log_batch(self.run_id, metrics=batch)
        self._last_flush = time.monotonic()

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._monitor is not None:
                self._monitor.finish()
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)
            if self._updates_parent:
                mlflow_runs.set_parent_status(self.client, self.parent_run_id, status)
            _OPEN.discard(self)

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


def _start_system_metrics(run_id: str, tracking_uri: str) -> Any:
    """MLflow's system-metrics sampler on this run; None (and a run without them) if it cannot start."""
    try:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Its start/stop INFO lines would land between the pipeline's progress lines.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

        monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception:  # noqa: BLE001 - e.g. psutil missing: training must not fail over it
        return None


def _metric_key(key: str) -> str:
    # MLflow allows alphanumerics and _ - . space / only.
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def _safe_uri(uri: str) -> str:
    """The URI without any user:password part, for messages."""
    parsed = urlparse(uri)
    if parsed.password or parsed.username:
        return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl()
    return uri
