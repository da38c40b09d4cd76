"""MLflow implementation of the ``Tracker`` protocol that training code logs through.

One MLflow run per stage execution. Params are the resolved config flattened to dotted keys;
metrics keep their steps; tags tie every number to its code (``git.commit``), orchestrator run
(``kfp.run_id``) and data (``dvc.<input>`` / ``dvc.output`` md5s). The tracking URI comes from
an explicit argument, ``MLFLOW_TRACKING_URI``, or ``config.tracking.uri`` when the config has
one; ``sqlite:///path.db`` works with artifacts kept next to the database.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import medsight

# MLflow 3 reports usage to a remote endpoint by default, and its DNS lookup can stall a
# sandboxed or air-gapped pod for minutes. Off unless the user explicitly turns it on; this runs
# before any module here imports mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_EXPERIMENT = "medsight"
ARTIFACTS_ENV = "MEDSIGHT_MLFLOW_ARTIFACTS"
_PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000


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


def git_commit() -> str:
    """The code version: baked into the image as MEDSIGHT_GIT_COMMIT, else asked from git."""
    commit = os.environ.get("MEDSIGHT_GIT_COMMIT")
    if commit:
        return commit
    repo = Path(medsight.__file__).resolve().parents[1]
    try:
        result = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


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


def _default_tags(stage: str) -> dict[str, str]:
    tags = {
        "medsight.stage": stage,
        "medsight.version": medsight.__version__,
        "git.commit": git_commit(),
    }
    if os.environ.get("KFP_RUN_ID"):
        tags["kfp.run_id"] = os.environ["KFP_RUN_ID"]
    return tags


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
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            self.experiment_id = self._experiment_id(experiment)
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        except Exception as error:
            raise TrackingError(f"MLflow at {_safe_uri(tracking_uri)} is not usable: {error}") from error
        self.run_id: str = run.info.run_id
        self.flush_every = flush_every
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        self._logged_params: dict[str, str] = {}
        self._closed = False
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
    ) -> MLflowTracker:
        tracking_uri = resolve_tracking_uri(config, uri)
        if not tracking_uri:
            raise TrackingError(
                "no MLflow tracking URI: set MLFLOW_TRACKING_URI (e.g. sqlite:///runs/mlflow.db) "
                "or config tracking.uri"
            )
        tracking = getattr(config, "tracking", None)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or getattr(tracking, "experiment", None) or DEFAULT_EXPERIMENT
        tracker = cls(
            tracking_uri,
            run_name=run_name or stage,
            experiment=experiment,
            tags={**_default_tags(stage), "medsight.preset": str(getattr(config, "preset", "")), **(tags or {})},
        )
        if config is not None and log_config:
            from medsight.config import to_dict

            tracker.log_params(to_dict(config))
        return tracker

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=default_artifact_location(self.tracking_uri))
        except Exception:
            # Another stage process created it between our lookup and create.
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

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
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)
            _OPEN.discard(self)

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


def _metric_key(key: str) -> str:
    # MLflow allows alphanumerics and _ - . space / only.
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def _safe_uri(uri: str) -> str:
    """The URI without any user:password part, for messages."""
    parsed = urlparse(uri)
    if parsed.password or parsed.username:
        return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl()
    return uri
