"""`dvc repro` runs the registry's stages through `medsight stage run`, without Kubeflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"
    return result


def test_dvc_repro_reproduces_stages_and_skips_unchanged(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    # The stage modules are dvc.yaml deps; the code that runs is the installed package.
    shutil.copytree(ROOT / "medsight", repo / "medsight", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(train_images=8, val_images=4, test_images=4)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)

    _run([str(BIN / "dvc"), "repro", "base-models"], repo)
    # base-models runs after the data check (a gate: an 'after' edge in dvc.yaml).
    for stage in ("synth-data", "data-check", "base-models"):
        assert (repo / "outputs" / stage / "stage.json").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"synth-data", "data-check", "base-models"}
    assert "outputs/synth-data" in [dep["path"] for dep in lock["base-models"]["deps"]]

    again = _run([str(BIN / "dvc"), "repro", "base-models"], repo)
    assert "didn't change" in again.stdout and "Running stage" not in again.stdout
    # A param the data stage reads marks it (and what follows) as changed.
    params["data"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run([str(BIN / "dvc"), "status", "--with-deps", "base-models"], repo).stdout
    assert "synth-data:" in status and "modified:" in status and "data" in status
    params["data"]["seed"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Code a stage imports (not its own module) is a dep too: an edit there reruns that stage only.
    with open(repo / "medsight" / "model" / "llm.py", "a") as handle:
        handle.write("\n# an edit\n")
    status = _run([str(BIN / "dvc"), "status", "base-models"], repo).stdout
    assert "base-models:" in status and "medsight/model/llm.py" in status and "synth-data:" not in status
