"""How MedSIGHT's MLflow runs are organised, the way MLflow's UI expects them.

- One experiment (``medsight``), tagged as model training (``mlflow.experimentKind``), so the UI
  opens on Runs, not in its GenAI mode where runs are filed under "Evaluations".
- One parent run per pipeline run, with a nested child run per stage (``mlflow.parentRunId``).
  The local runner creates the parent and hands its id to the components
  (``MEDSIGHT_MLFLOW_PARENT_RUN_ID``) or lets each stage find the parent by its pipeline run id
  (``medsight.run_id`` tag: the KFP run id, or an in-process chain's ``MEDSIGHT_RUN_ID``) or
  create it; concurrent creators agree on the oldest.
- The standard ``mlflow.source.*`` tags (git commit, source name and type) and ``mlflow.user``.
- Every stage input logged as a dataset input whose source is its DVC object in the store.
- A sqlite store is created with its default artifact root beside the database, and its
  auto-created "Default" experiment is archived, so nothing points at ``./mlruns``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsight.stages.lineage import RUN_ID_ENV, git_commit, pipeline_run_id, user_name

PARENT_ENV = "MEDSIGHT_MLFLOW_PARENT_RUN_ID"
# "1": a runner (the local one) opened the parent run and finishes it; stages leave its status alone.
PARENT_OWNED_ENV = "MEDSIGHT_MLFLOW_PARENT_OWNED"
REPO_URL_ENV = "MEDSIGHT_GIT_REPO_URL"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
ROLE_TAG = "medsight.role"
RUN_TAG = "medsight.run_id"  # the pipeline run (KFP run or chain) a run belongs to
PIPELINE_ROLE = "pipeline"
STAGE_ROLE = "stage"
DVC_SOURCE_TYPE = "dvc"


def source_tags(source_name: str) -> dict[str, str]:
    """``mlflow.source.*`` and ``mlflow.user`` for a run started by ``source_name``."""
    tags = {
        "mlflow.source.name": source_name,
        "mlflow.source.type": "JOB" if os.environ.get(RUN_ID_ENV) else "LOCAL",
        "mlflow.source.git.commit": git_commit(),
        "mlflow.user": user_name(),
    }
    if os.environ.get(REPO_URL_ENV):
        tags["mlflow.source.git.repoURL"] = os.environ[REPO_URL_ENV]
    return tags


def prepare_sqlite_store(tracking_uri: str, artifact_root: str | None) -> None:
    """Create a new sqlite tracking database with ``artifact_root`` as its default artifact
    location and archive its "Default" experiment; an existing database is left as it is.

    Creating one migrates its schema (seconds). Processes that start on a new store together (the
    local runner's parent run and the first stages) take turns on a lock file: two migrating one
    file fail ("duplicate column name"). The schema is built in a temporary file renamed into
    place, so a creator killed half-way leaves no half-migrated database behind."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    if database.exists():
        return
    import fcntl

    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if database.exists():
            return  # made by whoever held the lock before us
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        building = database.with_name(f".{database.name}.{os.getpid()}.new")
        building.unlink(missing_ok=True)
        store = SqlAlchemyStore(f"sqlite:///{building}",
                                artifact_root or (database.resolve().parent / "mlartifacts").as_uri())
        try:
            # MLflow makes experiment 0 on every new database; MedSIGHT never logs there.
            store.delete_experiment(SqlAlchemyStore.DEFAULT_EXPERIMENT_ID)
        except Exception:  # noqa: BLE001 - an older MLflow that refuses: the experiment then stays
            pass
        finally:
            store.engine.dispose()
        os.replace(building, database)


def mark_model_training(client: Any, experiment_id: str) -> None:
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def _pipeline_runs(client: Any, experiment_id: str, kfp_run_id: str) -> list[Any]:
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{ROLE_TAG}` = '{PIPELINE_ROLE}' and tags.`{RUN_TAG}` = '{kfp_run_id}'",
        max_results=20,
    )
    return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))


def find_or_create_parent(client: Any, experiment_id: str, kfp_run_id: str, tags: Mapping[str, str]) -> str:
    """The parent run of pipeline run ``kfp_run_id``: the oldest one tagged with it, else a new one.

    Two components starting at once may both create one; each then re-reads and keeps the
    oldest, and the newer duplicate is deleted, so every stage ends up under the same parent.
    """
    found = _pipeline_runs(client, experiment_id, kfp_run_id)
    if found:
        return found[0].info.run_id
    created = client.create_run(experiment_id, run_name=f"pipeline {kfp_run_id}", tags={
        **tags, ROLE_TAG: PIPELINE_ROLE, RUN_TAG: kfp_run_id, "mlflow.runName": f"pipeline {kfp_run_id}"})
    oldest = _pipeline_runs(client, experiment_id, kfp_run_id)[0].info.run_id
    if oldest != created.info.run_id:
        client.delete_run(created.info.run_id)
    return oldest


def parent_run_id(client: Any, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """The parent for a stage run: the runner's (env), else the pipeline run's (cluster), else none."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    if pipeline_run_id():
        return find_or_create_parent(client, experiment_id, pipeline_run_id(), tags)
    return None


def parent_status_is_ours() -> bool:
    """Stages keep the parent's status only when no runner owns it (a KFP run on a cluster)."""
    return not os.environ.get(PARENT_ENV) and os.environ.get(PARENT_OWNED_ENV, "") in ("", "0")


def set_parent_status(client: Any, parent_id: str | None, status: str) -> None:
    """RUNNING while a stage runs, then the stage's end status (the last stage's sticks)."""
    if not parent_id:
        return
    if status == "RUNNING":
        client.update_run(parent_id, status="RUNNING")
    else:
        client.set_terminated(parent_id, status=status)


def dataset_inputs(lineage: Mapping[str, Any], store_url: str = "") -> list[Any]:
    """Each stage input as an MLflow dataset whose source is its DVC object (md5 + store)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for name, entry in sorted(lineage.get("inputs", {}).items()):
        md5 = entry.get("md5", "")
        source = {"md5": md5, "stage": entry.get("stage", ""), "remote": f"{store_url}/dvc" if store_url else "",
                  "uri": entry.get("store_uri", ""), "pull": f"dvc pull {entry.get('stage') or name}"}
        dataset = Dataset(
            name=f"{name} ({entry.get('stage') or 'input'})",
            digest=md5.removesuffix(".dir")[:36],
            source_type=DVC_SOURCE_TYPE,
            source=json.dumps(source, sort_keys=True),
        )
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", name)]))
    return inputs


def log_restored_stage(client: Any, experiment_id: str, parent_id: str, record: Mapping[str, Any]) -> str:
    """A child run for a stage restored from the run-cache: its metrics and versions, and a link
    (``medsight.source_mlflow_run_id``) to the run that computed the output."""
    from mlflow.entities import Metric, RunTag

    stage = record["stage"]
    tags = {
        "mlflow.parentRunId": parent_id, ROLE_TAG: STAGE_ROLE, "medsight.stage": stage, "medsight.cache_hit": "true",
        "medsight.source_mlflow_run_id": str(record.get("mlflow_run_id") or ""), "dvc.output": record["ref"]["md5"],
        "medsight.cache_key": record.get("cache_key", ""), "kfp.run_id": record.get("run_id", ""),
        RUN_TAG: record.get("run_id", ""),
        **{f"dvc.{name}": md5 for name, md5 in record.get("inputs", {}).items()},
        **source_tags(f"medsight stage run {stage}"),
    }
    run = client.create_run(experiment_id, run_name=f"{stage} (restored)", tags={k: v for k, v in tags.items() if v})
    now = run.info.start_time
    metrics = [Metric(key, float(value), now, 0) for key, value in record.get("metrics", {}).items()]
    if metrics:
        client.log_batch(run.info.run_id, metrics=metrics, tags=[RunTag("medsight.restored", "true")])
    lineage = {"inputs": {name: {"md5": md5} for name, md5 in record.get("inputs", {}).items()}}
    datasets = dataset_inputs(lineage, os.environ.get("MEDSIGHT_STORE_URL", ""))
    if datasets:
        client.log_inputs(run.info.run_id, datasets=datasets)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
