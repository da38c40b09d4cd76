"""A checkpoint's inputs are found by the DVC hash its stage.json records (no store needed here;
the store path is covered by test_lineage_and_mlflow.py and the e2e test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsight.platform.resolve import ResolveError, resolve_input
from medsight.stages.content_hash import directory_md5


def _output(root: Path, name: str, content: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "weights.txt").write_text(content)
    return folder


def _checkpoint(root: Path, base_md5: str, path: str | None) -> Path:
    checkpoint = _output(root, "instruct-tune", "model")
    entry = {"md5": base_md5, "stage": "base-models", **({"path": path} if path else {})}
    (checkpoint / "stage.json").write_text(json.dumps({"stage": "instruct-tune", "key": "k", "inputs": {"base": entry}}))
    return checkpoint


@pytest.fixture(autouse=True)
def _no_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MEDSIGHT_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDSIGHT_HASH_INDEX", str(tmp_path / "index.sqlite"))
    monkeypatch.chdir(tmp_path)  # no runs/platform here


def test_recorded_local_path_is_used_when_it_still_holds_the_hash(tmp_path: Path) -> None:
    base = _output(tmp_path / "chain", "base-models", "tokenizer")
    checkpoint = _checkpoint(tmp_path / "ckpt", directory_md5(base), str(base))
    assert resolve_input(checkpoint, "base") == base
    (base / "weights.txt").write_text("changed since")  # the same path, other bytes: not that input
    with pytest.raises(ResolveError, match="dvc pull base-models"):
        resolve_input(checkpoint, "base")


def test_a_sibling_output_of_the_same_hash_is_found(tmp_path: Path) -> None:
    """The layout of a run-repo clone: outputs/instruct-tune next to outputs/base-models."""
    base = _output(tmp_path / "clone" / "outputs", "base-models", "tokenizer")
    checkpoint = _checkpoint(tmp_path / "clone" / "outputs", directory_md5(base), None)
    assert resolve_input(checkpoint, "base") == base


def test_missing_input_names_its_hash_and_how_to_get_it(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "ckpt", "0" * 32 + ".dir", "/tmp/gone/in-base")
    with pytest.raises(ResolveError) as error:
        resolve_input(checkpoint, "base")
    assert "0" * 32 in str(error.value) and "MEDSIGHT_S3_ENDPOINT" in str(error.value)
    with pytest.raises(ResolveError, match="no stage.json records an input 'data'"):
        resolve_input(checkpoint, "data")
