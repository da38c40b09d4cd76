"""Issue 9: nothing lost, nothing stale. The runner never deletes what it did not write, swaps a
new output in only when complete, keys inputs by their content; atomic writes keep normal modes
and never lose the previous copy; a symlink loop is called one."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from medsight.config import apply_overrides, get_preset
from medsight.io_utils import atomic_directory, atomic_write_text, missing_reason, replace_directory
from medsight.stages.runner import run_stage

SMALL = ["data.train_images=6", "data.val_images=3", "data.test_images=3"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): "still there, byte for byte"."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("safety")
    config = apply_overrides(get_preset("tiny"), SMALL)
    run_stage("synth-data", config, {}, root / "data")
    return root / "data", config


@pytest.fixture
def fake_base_models(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """base-models without its 15 s of tokenizer and LLM building: the runner is under test."""
    import medsight.stages.base_models as base_models

    calls: list[int] = []

    def run(config, inputs, output, tracker):
        calls.append(1)
        (Path(output) / "weights.txt").write_text("stand-in weights\n")
        return {"vocab_size": 1.0}

    monkeypatch.setattr(base_models, "run", run)
    return calls


@pytest.mark.parametrize("force", [False, True], ids=["rerun", "force"])
@pytest.mark.parametrize("where", ["the input", "inside the input", "above the input"])
def test_an_out_overlapping_an_input_is_refused_and_every_input_file_survives(dataset, tmp_path, where, force,
                                                                             fake_base_models):
    source, config = dataset
    work = tmp_path / "work"
    data = work / "data"
    shutil.copytree(source, data)
    before = snapshot(work)
    out = {"the input": data, "inside the input": data / "biomedparse" / "models", "above the input": work}[where]
    with pytest.raises(ValueError, match=rf"--out {out} overlaps input data={data}"):
        run_stage("base-models", config, {"data": data}, out, reuse=not force)
    assert snapshot(work) == before
    assert not fake_base_models  # refused before any work


@pytest.mark.parametrize("force", [False, True], ids=["rerun", "force"])
def test_a_users_file_in_the_output_survives_a_rerun_with_another_setting(dataset, tmp_path, force):
    _, config = dataset
    out = tmp_path / "out"
    run_stage("synth-data", config, {}, out)
    (out / "notes.txt").write_text("my observations about this dataset\n")
    before = snapshot(out)
    changed = apply_overrides(config, ["data.seed=7"])
    with pytest.raises(ValueError, match=r"holds files the stage did not write \(notes\.txt\)"):
        run_stage("synth-data", changed, {}, out, reuse=not force)
    assert snapshot(out) == before


def test_a_folder_no_stage_wrote_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("\\documentclass{article}\n")
    config = apply_overrides(get_preset("tiny"), SMALL)
    with pytest.raises(ValueError, match=rf"--out {out} holds files that no stage wrote"):
        run_stage("synth-data", config, {}, out)
    assert (out / "thesis.tex").read_text() == "\\documentclass{article}\n"


def test_the_previous_output_survives_a_failed_rerun(dataset, tmp_path):
    _, config = dataset
    out = tmp_path / "out"
    run_stage("synth-data", config, {}, out)
    before = snapshot(out)
    # Passes the config check, then fails inside the stage (lesions need 32 px).
    failing = apply_overrides(config, ["data.image_size=16"])
    with pytest.raises(ValueError, match="data.image_size must be >= 32"):
        run_stage("synth-data", failing, {}, out)
    assert snapshot(out) == before
    # Its replacement arrives whole: only then is the old one gone.
    rerun = run_stage("synth-data", apply_overrides(config, ["data.seed=3"]), {}, out)
    assert not rerun.reused and snapshot(out) != before and (out / "stage.json").is_file()


def test_an_input_edited_after_a_run_is_not_reused(dataset, tmp_path, fake_base_models):
    source, config = dataset
    data = tmp_path / "data"
    shutil.copytree(source, data)
    out = tmp_path / "base"
    assert not run_stage("base-models", config, {"data": data}, out).reused
    assert run_stage("base-models", config, {"data": data}, out).reused
    # The dataset keeps its stage.json: only its content says it changed.
    corpus = data / "corpus.txt"
    corpus.write_text(corpus.read_text() + "an edited line\n")
    assert not run_stage("base-models", config, {"data": data}, out).reused
    image = next((data / "raw" / "biomedparse").rglob("train/*.png"))
    image.write_bytes(image.read_bytes()[::-1])  # same size, other bytes
    assert not run_stage("base-models", config, {"data": data}, out).reused
    assert len(fake_base_models) == 3


def test_a_symlink_loop_is_called_one(tmp_path):
    loop = tmp_path / "a"
    loop.symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(loop)
    config = apply_overrides(get_preset("tiny"), SMALL)
    with pytest.raises(ValueError, match=rf"input data={loop} is a symlink loop"):
        run_stage("base-models", config, {"data": loop}, tmp_path / "out")
    from medsight.data.image_io import DataError, load_image

    with pytest.raises(DataError, match="symlink loop"):
        load_image(loop)
    assert missing_reason(loop) == "is a symlink loop"
    assert missing_reason(tmp_path / "nothing") == "does not exist"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_get_the_mode_any_new_file_gets(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert _mode(tmp_path / "atomic.txt") == _mode(plain)
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "private.txt", "x")
        assert _mode(tmp_path / "private.txt") == 0o640
    finally:
        os.umask(old)
    with atomic_directory(tmp_path / "folder") as folder:
        (folder / "f").write_text("x")
    (tmp_path / "plain-folder").mkdir()
    assert _mode(tmp_path / "folder") == _mode(tmp_path / "plain-folder")


def test_atomic_directory_keeps_the_old_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint"
    with atomic_directory(target) as folder:
        (folder / "weights").write_text("old")
    # A failure while the new copy is written: the old one is untouched.
    with pytest.raises(RuntimeError), atomic_directory(target) as folder:
        (folder / "weights").write_text("half")
        raise RuntimeError("killed while saving")
    assert (target / "weights").read_text() == "old"
    # A crash between moving the old copy aside and moving the new one in: the old copy is still
    # on disk, whole (the pre-fix code deleted it first and lost both).
    real_replace = os.replace

    def crash_moving_in(src, dst):
        if Path(dst) == target:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_moving_in)
    with pytest.raises(OSError, match="power cut"), atomic_directory(target) as folder:
        (folder / "weights").write_text("new")
    assert "old" in {p.read_text() for p in tmp_path.rglob("weights")}
    monkeypatch.undo()
    # The normal swap leaves exactly the new copy.
    new = tmp_path / "new"
    new.mkdir()
    (new / "weights").write_text("newer")
    replace_directory(new, target)
    assert (target / "weights").read_text() == "newer" and not new.exists()
