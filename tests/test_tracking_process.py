"""A stage's MLflow run held by a helper process: same run as in-process, failures still surface."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsight.platform.tracking import TrackingError
from medsight.platform.tracking_process import TrackerProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("KFP_RUN_ID", "run-7")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    return uri


def test_the_helper_records_what_an_in_process_tracker_would(store: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from medsight.config import get_preset, to_dict
    from medsight.platform.tracking import flatten

    config = get_preset("tiny")
    tracker = TrackerProcess("perceiver-pretrain", config, tags={"dvc.data": "d" * 32 + ".dir"})
    for step in range(3):
        tracker.log_metrics({"perceiver-pretrain/loss": 1.0 / (step + 1)}, step=step)
    report = tmp_path / "report.html"
    report.write_text("<p>ok</p>")
    tracker.log_artifact(report, "outputs")
    report.unlink()  # logged before the call returned: the file may go right after
    tracker.set_tags({"dvc.output": "e" * 32 + ".dir"})
    run_id = tracker.run_id
    tracker.close()

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["perceiver_pretrain.lr"] == str(config.perceiver_pretrain.lr)
    # Every param, as the in-process tracker writes it (dotted keys, text values).
    assert run.data.params == {k: str(v) for k, v in flatten(to_dict(config)).items()}
    assert [m.step for m in client.get_metric_history(run_id, "perceiver-pretrain/loss")] == [0, 1, 2]
    assert run.data.tags["dvc.output"].startswith("e") and run.data.tags["dvc.data"].startswith("d")
    assert run.data.tags["kfp.run_id"] == "run-7" and run.data.tags["medsight.stage"] == "perceiver-pretrain"
    assert [a.path for a in client.list_artifacts(run_id, "outputs")] == ["outputs/report.html"]


def test_a_stage_process_that_dies_leaves_a_failed_run(store: str) -> None:
    from mlflow.tracking import MlflowClient

    tracker = TrackerProcess("codebook-pretrain")
    tracker.log_metrics({"loss": 2.0}, step=1)
    run_id = tracker.run_id
    # What the helper sees when the stage process is killed: its input ends without a close.
    tracker._closed = True
    tracker._finish_process()
    assert tracker._process.returncode == 0
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.metrics["loss"] == 2.0


def test_an_unusable_store_fails_the_stage_before_it_computes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = TrackerProcess("v2t-align")
    tracker.log_metrics({"loss": 1.0}, step=0)  # not waited on: no error yet
    with pytest.raises(TrackingError, match="not-a-folder"):
        tracker.run_id  # noqa: B018 - the runner asks for it before the stage computes
    tracker.close("FAILED")  # a failed stage closing its run: warns, does not mask the stage's error
    assert tracker._process.returncode == 0


def test_no_tracking_uri_is_reported_without_starting_a_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI"):
        TrackerProcess("evaluate")


def test_the_stage_process_itself_never_imports_mlflow(store: str, tmp_path: Path) -> None:
    """What the helper is for: MLflow loads in it, not in the process that computes the stage."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from medsight.config import get_preset\n"
        "from medsight.platform.tracking_process import TrackerProcess\n"
        "tracker = TrackerProcess('instruct-tune', get_preset('tiny'))\n"
        "tracker.log_metrics({'loss': 1.0}, step=0)\n"
        "print('RUN=' + tracker.run_id)\n"
        "tracker.close()\n"
        "print('MLFLOW_IMPORTED=' + str('mlflow' in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MLFLOW_IMPORTED=False" in done.stdout
    run_id = next(line for line in done.stdout.splitlines() if line.startswith("RUN=")).removeprefix("RUN=")
    from mlflow.tracking import MlflowClient

    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"
