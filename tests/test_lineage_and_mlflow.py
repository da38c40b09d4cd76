"""Lineage as versions and the MLflow run structure, through the real store path.

Every stage of the full graph runs through ``component_runtime.execute_stage`` (inputs pulled from
a real S3 server into throw-away workspaces, outputs pushed with DVC, MLflow on sqlite), with
quick stand-in stage functions that log curves and validation values like the real ones. Then:

- ``stage.json`` records inputs as DVC hashes (+ store URI), the run id and the git commit, never
  a temporary path;
- the evaluation's inputs alone carry every training stage's curve and validation values;
- a pulled checkpoint finds its base models in the store by hash;
- MLflow, read back through ``MlflowClient``: one parent per pipeline run with a child per stage,
  ``mlflow.source.*`` tags, the experiment marked as model training, inputs logged as datasets
  with their DVC source, system metrics, the final model logged as an MLflow model, and no
  active Default experiment or ``./mlruns``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from medsight.platform.artifacts import ArtifactStore
from medsight.platform.component_runtime import execute_stage, resolve_config
from medsight.stages.registry import STAGES, StageSpec, input_sources
from platform_fixtures import s3_server, store_env, tree_hashes  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

RUN_ID = "run-lineage-1"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TRAINING = ("perceiver-pretrain", "codebook-pretrain", "v2t-align", "t2v-align", "instruct-tune")
VALIDATION = {"perceiver-pretrain": "val_dice", "codebook-pretrain": "val_dice_quantized",
              "v2t-align": "val_lm_loss", "t2v-align": "val_lm_loss", "instruct-tune": "val_lm_loss"}


def _fake_load(spec: StageSpec) -> Any:
    def run(config: Any, inputs: dict[str, Path], output: Path, tracker: Any) -> dict[str, float]:
        from medsight.eval.curves import collect_curves

        (output / "weights.json").write_text(json.dumps({"stage": spec.name, "inputs": sorted(inputs)}))
        if spec.name in TRAINING:
            for step in (1, 2, 3, 4):
                tracker.log_metrics({f"{spec.name}/loss": 2.0 / step, f"{spec.name}/lm": 1.0 / step}, step=step)
            if spec.name == "instruct-tune":
                time.sleep(1.5)  # long enough for a system-metrics sample
            return {VALIDATION[spec.name]: 0.5}
        if spec.name == "evaluate":
            # What the report's curves are built from: the evaluation's (pulled) inputs only.
            curves = collect_curves(list(inputs.values()))
            (output / "curves.json").write_text(json.dumps(curves))
            (output / "inputs_seen.json").write_text(json.dumps({k: str(v) for k, v in inputs.items()}))
        return {"done": 1.0}

    return run


@pytest.fixture(scope="module")
def pipeline(s3_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    """The whole graph once, as a KFP run would execute it (store refs in, store refs out)."""
    root = tmp_path_factory.mktemp("lineage")
    patch = pytest.MonkeyPatch()
    env = {**s3_server.env(), "MEDSIGHT_STORE_URL": "s3://lineage/store", "MEDSIGHT_DVC_CACHE": str(root / "cache"),
           "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
           "KFP_RUN_ID": RUN_ID, "MEDSIGHT_GIT_COMMIT": COMMIT, "MEDSIGHT_VARIANT": "full",
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5", "MEDSIGHT_WORK_DIR": str(root / "work"),
           "MEDSIGHT_HASH_INDEX": str(root / "hash-index.sqlite")}
    for key, value in env.items():
        patch.setenv(key, value)
    patch.delenv("MEDSIGHT_MLFLOW_PARENT_RUN_ID", raising=False)
    patch.delenv("MEDSIGHT_MLFLOW_PARENT_OWNED", raising=False)
    patch.setattr(StageSpec, "load", _fake_load)
    patch.chdir(root)  # where a stray ./mlruns would appear
    config = resolve_config("tiny", [])
    refs: dict[str, str] = {}
    results = {}
    try:
        for spec in STAGES:
            inputs = {name: refs[source] for name, source in input_sources(spec, frozenset()).items()}
            result = execute_stage(spec.name, inputs, config)
            refs[spec.name] = result.ref.to_json()
            results[spec.name] = result
        yield {"root": root, "results": results, "env": env}
    finally:
        patch.undo()


def _pull(ref_json: str, target: Path) -> Path:
    from medsight.platform.artifacts import ArtifactRef

    with ArtifactStore().workspace(target) as ws:
        return ws.pull(ArtifactRef.parse(ref_json), "out")


def test_stage_json_records_versions_not_temp_paths(pipeline: dict, tmp_path: Path, monkeypatch) -> None:
    for key, value in pipeline["env"].items():
        monkeypatch.setenv(key, value)
    results = pipeline["results"]
    store = ArtifactStore()
    for stage in ("perceiver-pretrain", "instruct-tune", "evaluate"):
        folder = _pull(results[stage].ref.to_json(), tmp_path / stage)
        record = json.loads((folder / "stage.json").read_text())
        assert record["run"]["run_id"] == RUN_ID and record["run"]["git_commit"] == COMMIT
        assert record["run"]["variant"] == "full" and record["run"]["mlflow_run_id"]
        for name, entry in record["inputs"].items():
            assert "path" not in entry, f"{stage}.{name} records a local path: {entry}"
            assert entry["md5"] == results[entry["stage"]].ref.md5
            assert entry["store_uri"] == store.object_uri(entry["md5"])
        assert "/work/" not in (folder / "stage.json").read_text() and "in-" not in json.dumps(record["inputs"])


def test_curves_of_every_training_stage_travel_with_the_lineage(pipeline: dict, tmp_path: Path, monkeypatch) -> None:
    for key, value in pipeline["env"].items():
        monkeypatch.setenv(key, value)
    evaluation = _pull(pipeline["results"]["evaluate"].ref.to_json(), tmp_path / "eval")
    seen = json.loads((evaluation / "inputs_seen.json").read_text())
    assert all(not Path(path).exists() for path in seen.values())  # the workspace is gone: nothing on disk
    curves = json.loads((evaluation / "curves.json").read_text())
    for stage in TRAINING:
        assert [x for x, _ in curves[f"{stage}/loss"]] == [1.0, 2.0, 3.0, 4.0], stage
        assert curves[f"{stage}/{VALIDATION[stage]}"] == [[4.0, 0.5]], stage  # validation point at the last step


def test_pulled_checkpoint_finds_its_base_models_by_hash(pipeline: dict, tmp_path: Path, monkeypatch) -> None:
    from medsight.platform.resolve import resolve_input

    for key, value in pipeline["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-home"))
    checkpoint = _pull(pipeline["results"]["instruct-tune"].ref.to_json(), tmp_path / "ckpt")
    base = resolve_input(checkpoint, "base")
    assert base.is_relative_to(tmp_path / "cache-home")
    reference = _pull(pipeline["results"]["base-models"].ref.to_json(), tmp_path / "reference")
    assert tree_hashes(base) == tree_hashes(reference)
    assert resolve_input(checkpoint, "base") == base  # second time: from the local cache


def test_mlflow_structure_reads_back(pipeline: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pipeline["env"]["MLFLOW_TRACKING_URI"])
    experiments = client.search_experiments()
    assert [e.name for e in experiments] == ["medsight"]  # the Default experiment is archived
    experiment = experiments[0]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert not (pipeline["root"] / "mlruns").exists()
    assert "mlruns" not in client.get_experiment("0").artifact_location
    runs = client.search_runs([experiment.experiment_id], f"tags.`kfp.run_id` = '{RUN_ID}'")
    parents = [r for r in runs if r.data.tags.get("medsight.role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["medsight.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {spec.name for spec in STAGES}
    assert parent.info.status == "FINISHED"  # no runner owns it here: the last stage finished it
    for stage, run in children.items():
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == COMMIT and tags["mlflow.source.type"] == "JOB"
        assert tags["mlflow.source.name"] == f"medsight stage run {stage}" and tags["mlflow.user"]
        assert tags["medsight.variant"] == "full"
    instruct = children["instruct-tune"]
    datasets = {d.dataset.name: d.dataset for d in instruct.inputs.dataset_inputs}
    assert {"data (synth-data)", "base (base-models)", "grounding (grounding-data)", "t2v (t2v-align)"} <= set(datasets)
    data = datasets["data (synth-data)"]
    source = json.loads(data.source)
    assert data.source_type == "dvc" and source["md5"] == pipeline["results"]["synth-data"].ref.md5
    assert source["remote"] == "s3://lineage/store/dvc" and data.digest == source["md5"].removesuffix(".dir")
    assert any(key.startswith("system/") for key in instruct.data.metrics), sorted(instruct.data.metrics)
    # The stages here are fakes, so the evaluated "model" cannot be packaged for serving: that is
    # reported on the evaluation's run and never loses the evaluation (a real chain's model is
    # logged in test_model_registry.py::test_registered_model_is_an_mlflow_model).
    evaluation = children["evaluate"]
    assert "not a base-models output" in evaluation.data.tags["medsight.final_model_error"]
    assert evaluation.info.status == "FINISHED"
    assert not [m for m in client.search_logged_models([experiment.experiment_id])
                if m.source_run_id == evaluation.info.run_id]
