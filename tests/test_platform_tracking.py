"""MLflowTracker on a local sqlite store: params, stepped metrics, artifacts, lineage tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsight.platform.tracking import MLflowTracker, TrackingError, _safe_uri, flatten

pytestmark = pytest.mark.slow


def test_tracker_logs_params_metrics_artifacts_and_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from medsight.config import get_preset

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("KFP_RUN_ID", "run-123")
    monkeypatch.setenv("MEDSIGHT_GIT_COMMIT", "abc1234")
    config = get_preset("tiny")
    tracker = MLflowTracker.from_env(stage="perceiver-pretrain", config=config, tags={"dvc.data": "d" * 32 + ".dir"})
    for step in range(5):
        tracker.log_metrics({"perceiver-pretrain/loss": 1.0 / (step + 1), "bad:name": 1.0}, step=step)
    overlay = tmp_path / "overlays" / "case0.png"
    overlay.parent.mkdir()
    overlay.write_bytes(b"\x89PNG fake")
    tracker.log_artifact(overlay.parent, "overlays")
    tracker.log_params({"preset": "tiny"})  # same value again: no error
    tracker.set_tags({"dvc.output": "e" * 32 + ".dir"})
    tracker.close()

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.codebook.codes_per_modality"] == str(config.model.codebook.codes_per_modality)
    assert run.data.params["perceiver_pretrain.lr"] == str(config.perceiver_pretrain.lr)
    history = client.get_metric_history(tracker.run_id, "perceiver-pretrain/loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert "bad_name" in run.data.metrics
    tags = run.data.tags
    assert tags["kfp.run_id"] == "run-123" and tags["git.commit"] == "abc1234"
    assert tags["medsight.stage"] == "perceiver-pretrain" and tags["dvc.data"].endswith(".dir")
    assert tags["dvc.output"].startswith("e")
    assert [a.path for a in client.list_artifacts(tracker.run_id, "overlays")] == ["overlays/case0.png"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_failed_block_marks_run_failed(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(RuntimeError):
        with MLflowTracker(uri, run_name="x") as tracker:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FAILED"


def test_missing_uri_and_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI"):
        MLflowTracker.from_env(stage="x")
    assert _safe_uri("https://user:CHANGE_ME@mlflow.example:5000/") == "https://mlflow.example:5000/"
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}}) == {"a.b": 1, "a.c.d": [1, 2]}


def test_processes_starting_on_a_new_store_together_all_get_runs(tmp_path: Path) -> None:
    """The local runner's parent run and the first stages open a store that does not exist yet at
    the same moment: one migrates its schema while the others wait (no "duplicate column name"),
    and none sees a half-made database."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    opener = ("import sys\nfrom medsight.platform.tracking import MLflowTracker\n"
              "tracker = MLflowTracker(sys.argv[1], run_name=sys.argv[2], parent=None)\n"
              "tracker.close()\nprint(tracker.run_id)\n")
    children = [subprocess.Popen([sys.executable, "-c", opener, uri, f"run-{i}"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(3)]
    outputs = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    client = MlflowClient(uri)
    run_ids = [out.strip() for out, _ in outputs]
    assert len(set(run_ids)) == 3
    assert {client.get_run(run_id).info.status for run_id in run_ids} == {"FINISHED"}
    assert [e.name for e in client.search_experiments()] == ["medsight"]  # one experiment, Default archived
    assert sorted(p.name for p in (tmp_path / "mlflow").iterdir() if p.name != "mlflow.db.lock") == ["mlflow.db"]
