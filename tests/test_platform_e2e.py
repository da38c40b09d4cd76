"""The whole tiny DAG through kfp.local, DVC on a real S3 server, MLflow on sqlite.

Three runs in one work directory: first (everything computed and pushed), unchanged (nothing
recomputed), codebook size changed (exactly the downstream stages recomputed); then a checkpoint
is pulled from a fresh clone of the run repo with the `dvc` CLI. Stages are cut to one step.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medsight.platform.local_run import LocalRunRequest, LocalRunResult, run_local
from medsight.platform.s3_server import SeaweedS3Server
from medsight.stages.registry import STAGES

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TEST_OVERRIDES = [
    "data.train_images=12", "data.val_images=4", "data.test_images=4",
    *(f"{section}.{key}" for section in ("perceiver_pretrain", "codebook_pretrain", "v2t_align", "t2v_align",
                                         "instruct_tune") for key in ("max_steps=1", "batch_size=2")),
    "evaluate.max_new_tokens=8", "evaluate.report_samples=2",
]
ALL = [spec.name for spec in STAGES]
DOWNSTREAM_OF_CODEBOOK = {"codebook-pretrain", "grounding-data", "t2v-align", "instruct-tune", "evaluate", "register-model"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("platform")


def _run(workdir: Path, **changes: object) -> tuple[LocalRunResult, str]:
    console = io.StringIO()
    result = run_local(LocalRunRequest(workdir=workdir, overrides=list(TEST_OVERRIDES), **changes), console=console)
    return result, console.getvalue()


@pytest.fixture(scope="module")
def first(workdir: Path) -> tuple[LocalRunResult, str]:
    return _run(workdir)


@pytest.fixture
def server(workdir: Path, first: tuple[LocalRunResult, str]) -> SeaweedS3Server:
    # Each run starts and stops its own server; between runs, a test reopens the same data.
    with SeaweedS3Server(workdir / "s3") as running:
        yield running


def test_first_run_computes_every_stage(first: tuple[LocalRunResult, str]) -> None:
    result, console = first
    assert result.ran == ALL
    assert result.report is not None and result.report.is_file()
    for name in ALL:
        assert f"ok  {name}" in console  # per-stage progress lines
    assert (result.workdir / "repo" / "runs" / f"{result.run_id}.json").is_file()


def test_every_stage_output_is_in_the_dvc_remote(first: tuple[LocalRunResult, str], server: SeaweedS3Server,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from medsight.platform.artifacts import ArtifactRef, ArtifactStore

    for key, value in {**server.env(), "MEDSIGHT_STORE_URL": "s3://medsight/store"}.items():
        monkeypatch.setenv(key, value)
    store = ArtifactStore()
    records = store.load_lineage(first[0].run_id)
    assert sorted(r["stage"] for r in records) == sorted(ALL)
    for record in records:
        assert store.in_remote(ArtifactRef.parse(json.dumps(record["ref"]))), record["stage"]


def test_mlflow_has_one_parent_with_a_child_per_stage(first: tuple[LocalRunResult, str]) -> None:
    from mlflow.tracking import MlflowClient

    result = first[0]
    client = MlflowClient(result.tracking_uri)
    assert [e.name for e in client.search_experiments()] == ["medsight"]
    experiment = client.get_experiment_by_name("medsight")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], f"tags.`kfp.run_id` = '{result.run_id}'")
    [parent] = [r for r in runs if r.data.tags.get("medsight.role") == "pipeline"]
    assert parent.info.status == "FINISHED" and "wall_seconds" in parent.data.metrics
    assert any(key.startswith("system/") for key in parent.data.metrics)  # one sampler for the machine
    by_stage = {r.data.tags["medsight.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(by_stage) == set(ALL)
    run = by_stage["perceiver-pretrain"]
    assert run.data.params["model.perceiver.two_way"] == "True"
    assert "val_dice" in run.data.metrics
    assert {"mlflow.source.git.commit", "dvc.data", "dvc.base", "dvc.output", "medsight.cache_key"} <= set(run.data.tags)
    assert {d.dataset.source_type for d in run.inputs.dataset_inputs} == {"dvc"}
    assert by_stage["t2v-align"].data.tags["dvc.v2t"].endswith(".dir")
    evaluation = by_stage["evaluate"]
    [output] = evaluation.outputs.model_outputs  # the evaluated model, as an MLflow model
    import mlflow.pyfunc

    mlflow.set_tracking_uri(result.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    image = next(result.report.parent.rglob("*.png"))
    [answer] = model.predict([{"image": str(image), "question": "Is there a lesion?"}])
    assert isinstance(answer["answer"], str) and isinstance(answer["region_tokens"], list)


def test_report_has_every_training_stage_and_the_run(first: tuple[LocalRunResult, str]) -> None:
    html = first[0].report.read_text()
    assert f"full ({first[0].run_id})" in html
    for stage in ("perceiver-pretrain", "codebook-pretrain", "v2t-align", "t2v-align", "instruct-tune"):
        assert f'aria-label="{stage} training curves"' in html, stage


def test_unchanged_rerun_recomputes_nothing(first: tuple[LocalRunResult, str], workdir: Path) -> None:
    second, console = _run(workdir)
    assert second.ran == [] and second.cached == ALL
    assert "restored from run-cache" in console
    first_md5 = {s.stage: s.md5 for s in first[0].stages}
    assert {s.stage: s.md5 for s in second.stages} == first_md5


def test_codebook_size_change_recomputes_only_downstream(first: tuple[LocalRunResult, str], workdir: Path) -> None:
    third, _ = _run(workdir, variant="codebook-8")
    assert set(third.ran) == DOWNSTREAM_OF_CODEBOOK
    assert set(third.cached) == set(ALL) - DOWNSTREAM_OF_CODEBOOK


def test_checkpoint_pull_from_fresh_clone_is_byte_identical(first: tuple[LocalRunResult, str],
                                                           server: SeaweedS3Server, tmp_path: Path) -> None:
    from medsight.platform.storage import S3Settings, S3Storage

    result = first[0]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(result.workdir / "repo"), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", result.run_id], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSIGHT_")}
    env.update({**server.env(), "DVC_NO_ANALYTICS": "1"})
    dvc = str(Path(sys.executable).parent / "dvc")
    pulled = subprocess.run([dvc, "pull", "perceiver-pretrain"], cwd=clone, env=env,
                            capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stderr
    # The manifest in the remote lists every file's md5 as pushed by the run.
    md5 = next(s.md5 for s in result.stages if s.stage == "perceiver-pretrain")
    manifest = json.loads(S3Storage(S3Settings.from_env(server.env())).get_bytes(
        "medsight", f"store/dvc/files/md5/{md5[:2]}/{md5[2:]}"))
    root = clone / "outputs" / "perceiver-pretrain"
    assert manifest and all(
        hashlib.md5((root / entry["relpath"]).read_bytes()).hexdigest() == entry["md5"] for entry in manifest
    )
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == {e["relpath"] for e in manifest}


def test_single_stage_from_dvc_references(first: tuple[LocalRunResult, str], workdir: Path) -> None:
    run_id = first[0].run_id
    single, _ = _run(workdir, stage="perceiver-pretrain",
                     stage_inputs={"data": f"run:{run_id}/synth-data", "base": f"run:{run_id}/base-models"})
    assert [(s.stage, s.status) for s in single.stages] == [("perceiver-pretrain", "cached")]
    assert single.stages[0].md5 == next(s.md5 for s in first[0].stages if s.stage == "perceiver-pretrain")


def test_ablation_variants_share_upstream_stages(first: tuple[LocalRunResult, str], workdir: Path) -> None:
    # Both variants were computed by the runs above, so every stage of both is restored.
    ablation, _ = _run(workdir, variants=["full", "codebook-8"])
    assert ablation.ran == []
    evaluations = {s.md5 for s in ablation.stages if s.stage == "evaluate"}
    assert len(evaluations) == 2
    # The stages the two variants share ran once in this pipeline (one task), not once per variant.
    assert [s.stage for s in ablation.stages].count("perceiver-pretrain") == 1
    assert ablation.ablation_table and "| full |" in ablation.ablation_table and "| codebook-8 |" in ablation.ablation_table


def test_pull_command_gives_the_pushed_bytes(first: tuple[LocalRunResult, str], workdir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medsight.platform.cli import platform_app

    dest = tmp_path / "ckpt"
    result = CliRunner().invoke(platform_app, ["pull", "--workdir", str(workdir), "--run", first[0].run_id,
                                               "--stage", "base-models", "--dest", str(dest)])
    assert result.exit_code == 0, result.output
    md5 = next(s.md5 for s in first[0].stages if s.stage == "base-models")
    assert f"pulled {md5}" in result.output and any(dest.iterdir())
    listing = CliRunner().invoke(platform_app, ["runs", "--workdir", str(workdir)])
    assert first[0].run_id in listing.output


def test_pulled_checkpoint_alone_answers(first: tuple[LocalRunResult, str], server: SeaweedS3Server,
                                         tmp_path: Path) -> None:
    """`medsight predict` on a pulled instruct-tune output: its base models come from the store by hash."""
    result = first[0]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(result.workdir / "repo"), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", result.run_id], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSIGHT_")}
    env.update({**server.env(), "DVC_NO_ANALYTICS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"),
                "MEDSIGHT_STORE_URL": "s3://medsight/store"})
    bin_dir = Path(sys.executable).parent
    assert subprocess.run([str(bin_dir / "dvc"), "pull", "instruct-tune"], cwd=clone, env=env).returncode == 0
    image = next((result.workdir / "repo" / "outputs" / "evaluate").rglob("*.png"))
    answered = subprocess.run([sys.executable, "-m", "medsight.cli", "predict", "--checkpoint",
                               str(clone / "outputs" / "instruct-tune"), "--image", str(image),
                               "--question", "Is there a lesion?", "--out", str(tmp_path / "answer")],
                              env=env, capture_output=True, text=True, timeout=600)
    assert answered.returncode == 0, answered.stderr
    assert (tmp_path / "answer" / "answer.txt").is_file()


def test_run_local_json_is_alone_on_stdout(first: tuple[LocalRunResult, str], workdir: Path) -> None:
    """`run-local --json`: progress and messages on stderr, one JSON document on stdout."""
    args = [arg for override in TEST_OVERRIDES for arg in ("--set", override)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSIGHT_", "AWS_", "MLFLOW_TRACKING"))}
    done = subprocess.run([sys.executable, "-m", "medsight.cli", "platform", "run-local", "--workdir", str(workdir),
                           "--json", *args], capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert {s["stage"] for s in summary["stages"]} == set(ALL) and all(s["status"] == "cached" for s in summary["stages"])
    assert "ok  evaluate" in done.stderr
