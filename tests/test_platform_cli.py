"""The platform commands a user types: one clear line and the right exit code on failure (2 for
a wrong command line, 1 for failed work), never a traceback; JSON alone on stdout when asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medsight.platform.cli import platform_app
from medsight.platform.storage import S3Settings, StorageError

ROOT = Path(__file__).resolve().parents[1]


def _medsight(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSIGHT_", "AWS_", "MLFLOW_TRACKING"))}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "medsight.cli", *args], cwd=cwd or ROOT, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def _one_clear_line(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert len([line for line in result.stderr.splitlines() if line.startswith("error: ")]) == 1, result.stderr


def test_version() -> None:
    result = _medsight("--version")
    assert result.returncode == 0 and result.stdout.startswith("medsight 0.")


def test_runs_outside_a_platform_dir_is_a_usage_error(tmp_path: Path) -> None:
    result = _medsight("platform", "runs", cwd=tmp_path)
    assert result.returncode == 2
    _one_clear_line(result)
    assert "--workdir" in result.stderr and "medsight-s3 Secret" not in result.stderr


def test_missing_store_settings_name_the_secret_that_exists() -> None:
    with pytest.raises(StorageError) as error:
        S3Settings.from_env({})
    assert "Secret medsight-s3-credentials" in str(error.value) and "ConfigMap medsight-platform" in str(error.value)
    manifests = (ROOT / "manifests" / "base" / "minio.yaml").read_text()
    assert "medsight-s3-credentials" in manifests


def test_submit_is_mounted_and_compile_names_it() -> None:
    result = CliRunner().invoke(platform_app, ["submit", "--help"])
    assert result.exit_code == 0 and "--host" in result.output
    missing = CliRunner().invoke(platform_app, ["submit", "pipelines/compiled/nope.yaml", "--host", "http://kfp.invalid"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    from pipelines import compile as compiler

    source = Path(compiler.__file__).read_text()
    assert "medsight platform submit" in source and "medsight submit " not in source


def test_usage_errors_exit_2_and_keep_their_quotes(tmp_path: Path) -> None:
    result = _medsight("platform", "compile", "--variant", "nope")
    assert result.returncode == 2
    _one_clear_line(result)
    assert "unknown variant 'nope';" in result.stderr  # the closing quote is kept
    parse = _medsight("config", "show", "--set", "model.llm.hidden_size=abc")
    assert parse.returncode == 2 and parse.stderr.strip().endswith("got 'abc'"), parse.stderr
    for args in (["platform", "pull", "--dest", str(tmp_path / "d")],
                 ["platform", "run-local", "--input", "data=x"],
                 ["platform", "s3-serve", "--dir", str(tmp_path / "missing")]):
        result = CliRunner().invoke(platform_app, args[1:])
        assert result.exit_code == 2, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_stage_run_prints_only_json_on_stdout(tmp_path: Path) -> None:
    result = _medsight("stage", "run", "synth-data", "--out", str(tmp_path / "data"),
                       "--set", "data.train_images=2", "--set", "data.val_images=1", "--set", "data.test_images=1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["train_images"] == 2.0
    assert "synth-data: done" in result.stderr


@pytest.mark.slow
def test_runs_and_pull_share_a_running_s3_serve(tmp_path: Path) -> None:
    """`platform runs`/`pull` while `s3-serve` serves the same directory: they use that server."""
    from medsight.platform.s3_server import SeaweedS3Server

    workdir = tmp_path / "platform"
    with SeaweedS3Server(workdir / "s3"):  # what s3-serve runs (its own credentials.json)
        result = _medsight("platform", "runs", "--workdir", str(workdir), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == [] and "already serving" in result.stderr
        pulled = _medsight("platform", "pull", "--workdir", str(workdir), "--md5", "0" * 32 + ".dir",
                           "--dest", str(tmp_path / "out"))
        assert pulled.returncode == 1  # nothing stored under that hash: a failure, not a usage error
        _one_clear_line(pulled)
        assert "already serving" in pulled.stderr and "0" * 32 in pulled.stderr
        # Against the store too, stdout carries the metrics JSON alone (DVC's chatter included).
        stored = _medsight("stage", "run", "synth-data", "--store", "--workdir", str(workdir),
                           "--set", "data.train_images=2", "--set", "data.val_images=1", "--set", "data.test_images=1")
        assert stored.returncode == 0, stored.stderr
        assert json.loads(stored.stdout)["train_images"] == 2.0
