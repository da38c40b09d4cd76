"""The model registry on a real MLflow sqlite store with S3 (SeaweedFS) artifacts: the gate, the
lineage tags, `medsight registry list/show/promote`, the MLflow model itself, and deploy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trained_model import MULTI_REGION_QUESTION, ROOT, python_env

pytestmark = pytest.mark.slow
STAGES = ("synth-data", "base-models", "perceiver-pretrain", "codebook-pretrain", "v2t-align", "grounding-data",
          "t2v-align", "instruct-tune", "evaluate")


@pytest.fixture()
def registry_env(registry, monkeypatch):
    for key, value in registry.env.items():
        monkeypatch.setenv(key, value)
    return registry


def cli(*args: str) -> tuple[int, str]:
    from medsight.cli import _mount_optional_apps, app

    _mount_optional_apps()
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def dvc_add_md5(directory: Path, tmp_path: Path) -> str:
    """What `dvc add` records for a copy of ``directory`` (the real tool, in a scratch repo)."""
    import shutil

    repo = tmp_path / "dvc-repo"
    shutil.copytree(directory, repo / "out")
    env = python_env(DVC_NO_ANALYTICS="1")
    dvc = [sys.executable, "-m", "dvc"]
    for command in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "add", "-q", "out"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    import yaml

    return yaml.safe_load((repo / "out.dvc").read_text())["outs"][0]["md5"]


def test_registered_version_carries_lineage(registry_env, trained_chain, tmp_path):
    from medsight.platform.model_registry import show_version

    info = show_version("medsight", "production")
    tags = info.tags
    assert info.version == registry_env.registration.version
    assert tags["kfp.run_id"] == "test-run-123"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["git.commit"] == head
    for stage in STAGES:  # every input and checkpoint of the chain
        assert tags[f"dvc.{stage}"].endswith(".dir"), stage
    assert tags["dvc.instruct-tune"] == dvc_add_md5(trained_chain.model, tmp_path)
    for metric in ("seg_dice", "closed_accuracy", "mecovqa_dice"):
        assert float(tags[f"eval.{metric}"]) == pytest.approx(trained_chain.metrics[metric], rel=1e-5)
    assert set(k.removeprefix("gate.") for k in tags if k.startswith("gate.")) == set(registry_env.thresholds)
    assert "Passed" in info.description


def test_gate_refuses_a_model_below_threshold(registry_env, trained_chain):
    from medsight.platform.model_registry import list_versions, register_from_evaluation

    before = [v.version for v in list_versions("medsight")]
    too_high = {"mecovqa_dice": trained_chain.metrics["mecovqa_dice"] + 0.01}
    result = register_from_evaluation(trained_chain.evaluate, trained_chain.model, trained_chain.base, too_high)
    assert not result.registered and "mecovqa_dice" in result.gate.failures[0]
    assert [v.version for v in list_versions("medsight")] == before
    code, output = cli("registry", "register", "--evaluate", str(trained_chain.evaluate), "--model", str(trained_chain.model),
                       "--threshold", f"mecovqa_dice={too_high['mecovqa_dice']:.4f}")
    assert code == 1 and "below the threshold" in output and "not registered" in output
    code, output = cli("registry", "register", "--evaluate", str(trained_chain.evaluate), "--model", str(trained_chain.model),
                       "--threshold", "no_such_metric=0.1")
    assert code == 1 and "no_such_metric not in the evaluation metrics" in output


def test_list_show_promote_commands(registry_env, trained_chain):
    first = registry_env.registration.version
    code, output = cli("registry", "register", "--evaluate", str(trained_chain.evaluate), "--model", str(trained_chain.model),
                       "--threshold", "mecovqa_dice=0.0", "--alias", "staging")
    assert code == 0, output
    code, output = cli("registry", "list", "--name", "medsight", "--json")
    assert code == 0, output
    versions = json.loads(output)
    second = versions[0]["version"]
    assert int(second) == int(first) + 1 and versions[0]["aliases"] == ["staging"]
    assert "production" in next(v for v in versions if v["version"] == first)["aliases"]
    try:
        code, output = cli("registry", "promote", "medsight", second)
        assert code == 0 and f"version {second} (was version {first})" in output, output
        code, output = cli("registry", "show", "medsight", "production")
        shown = json.loads(output)
        assert shown["version"] == second and shown["serve"] == f"medsight serve --model models:/medsight/{second}"
        assert shown["files"].startswith("s3://medsight-mlflow/artifacts/")
        code, output = cli("registry", "promote", "medsight", second, "--alias", "Prod!")
        assert code == 2 and "alias" in output
        code, output = cli("registry", "show", "medsight", "99")
        assert code == 1 and "no version or alias '99'" in output
    finally:
        cli("registry", "promote", "medsight", first)  # the served model stays version 1
    assert json.loads(cli("registry", "show", "medsight", "production")[1])["version"] == first


def test_registered_model_is_an_mlflow_model(registry_env, trained_chain, tmp_path):
    import base64

    import mlflow.pyfunc
    import pandas as pd

    from medsight.platform.final_model import log_final_model

    logged = log_final_model(trained_chain.model, trained_chain.base, lineage={"kfp_run_id": "r"}, metrics={"seg_dice": 0.5})
    model = mlflow.pyfunc.load_model(logged.model_uri)
    image = base64.b64encode(trained_chain.test_images[0].read_bytes()).decode()
    [answer] = model.predict(pd.DataFrame({"image": [image], "question": [MULTI_REGION_QUESTION]}), params={"max_new_tokens": 48})
    assert answer["answer"] and len(answer["regions"]) == answer["answer"].count("[C")
    registered = mlflow.pyfunc.load_model("models:/medsight@production")
    assert registered.predict(pd.DataFrame({"image": [image], "question": [MULTI_REGION_QUESTION]}))[0]["answer"] == answer["answer"]


def test_deploy_points_kserve_at_the_registered_files(registry_env, tmp_path):
    import yaml

    from medsight.platform.storage import S3Settings, S3Storage, parse_s3_url

    code, output = cli("registry", "deploy", "medsight", "production", "--overlay", "cpu", "--manifests",
                       str(ROOT / "manifests" / "serving"), "-o", str(tmp_path / "isvc.yaml"))
    assert code == 0, output
    docs = [d for d in yaml.safe_load_all((tmp_path / "isvc.yaml").read_text()) if d]
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    env = {e["name"]: e.get("value") for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    bucket, prefix = parse_s3_url(env["STORAGE_URI"])
    # What KServe's storage initializer would copy to /mnt/models holds the whole package.
    keys = S3Storage(S3Settings.from_env(dict(os.environ))).list_keys(bucket, prefix)
    names = {key.removeprefix(prefix).lstrip("/") for key in keys}
    assert "MLmodel" in names and any(n.endswith("package.json") for n in names)
    assert any(n.endswith("llm/model.safetensors") for n in names) and any(n.endswith("encoder/model.safetensors") for n in names)
