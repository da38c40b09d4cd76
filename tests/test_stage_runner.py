"""Stage runner: input validation, lineage, reuse, clear errors on bad data, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from medsight.config import apply_overrides, get_preset
from medsight.stages.runner import STAGE_FILE, run_stage

SMALL = ["data.train_images=12", "data.val_images=6", "data.test_images=6", "perceiver_pretrain.max_steps=2"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    config = apply_overrides(get_preset("tiny"), SMALL)
    run_stage("synth-data", config, {}, root / "data")
    run_stage("base-models", config, {"data": root / "data"}, root / "base")
    return root, config


def test_stage_writes_lineage_and_reuses_when_unchanged(small_run, tmp_path):
    root, config = small_run
    inputs = {"data": root / "data", "base": root / "base"}
    run = run_stage("perceiver-pretrain", config, inputs, tmp_path / "p")
    assert not run.reused and "val_dice" in run.metrics
    for name in ("config.yaml", "metrics.json", STAGE_FILE, "modules/perceiver.safetensors"):
        assert (tmp_path / "p" / name).is_file(), name
    assert not (tmp_path / "p" / "checkpoints").exists()
    assert run_stage("perceiver-pretrain", config, inputs, tmp_path / "p").reused
    changed = apply_overrides(config, ["perceiver_pretrain.lr=0.0005"])
    assert not run_stage("perceiver-pretrain", changed, inputs, tmp_path / "p").reused


def test_input_validation_messages(small_run, tmp_path):
    root, config = small_run
    with pytest.raises(ValueError, match="missing input 'base'"):
        run_stage("perceiver-pretrain", config, {"data": root / "data"}, tmp_path / "p")
    with pytest.raises(ValueError, match="unknown input 'llm'"):
        run_stage("perceiver-pretrain", config, {"data": root / "data", "base": root / "base", "llm": root}, tmp_path / "p")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(root / "base", unfinished)
    (unfinished / STAGE_FILE).unlink()
    with pytest.raises(ValueError, match="unfinished stage output"):
        run_stage("perceiver-pretrain", config, {"data": root / "data", "base": unfinished}, tmp_path / "p")
    with pytest.raises(KeyError, match="unknown stage"):
        run_stage("percever-pretrain", config, {}, tmp_path / "p")


def _corrupt(data_dir, how: str) -> str:
    """Damage one training sample of a prepared copy of the dataset (after prepare checked it);
    returns the text the error must name."""
    index_file = data_dir / "biomedparse" / "train.jsonl"
    lines = index_file.read_text().splitlines()
    entry = json.loads(lines[0])
    image = data_dir / entry["image"]
    mask = data_dir / entry["regions"][0]["mask"]
    if how == "truncated image":
        image.write_bytes(image.read_bytes()[:60])
        return image.name
    if how == "mask size mismatch":
        from PIL import Image

        Image.new("L", (17, 17), 255).save(mask)
        return mask.name
    if how == "empty mask":
        from PIL import Image

        Image.new("L", Image.open(mask).size, 0).save(mask)
        return mask.name
    if how == "missing file":
        mask.unlink()
        return mask.name
    if how == "unknown modality":
        entry["modality"] = "Thermography"
        index_file.write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
        return "Thermography"
    raise AssertionError(how)


# Too many masks is no longer an error: images above max_masks_per_image are skipped (issue 11).
@pytest.mark.parametrize("how", ["truncated image", "mask size mismatch", "empty mask", "missing file", "unknown modality"])
def test_bad_data_fails_clearly_and_writes_nothing(small_run, tmp_path, how):
    root, _ = small_run
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    named = _corrupt(data, how)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "medsight.cli", "stage", "run", "perceiver-pretrain", "--out", str(out),
         "--input", f"data={data}", "--input", f"base={root / 'base'}", *sum((["--set", s] for s in SMALL), [])],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert named in result.stderr, result.stderr[-1500:]
    assert not (out / STAGE_FILE).exists() and not (out / "modules").exists()


def test_base_models_are_the_same_whatever_ran_before_in_the_process(small_run, tmp_path):
    """`medsight chain` runs base-models in-process after other work, KFP in a fresh interpreter;
    an unseeded random init made the two differ (and with them every downstream metric)."""
    import torch

    root, config = small_run
    torch.rand(1000)  # moves the global generator past where the fixture's run left it
    run_stage("base-models", config, {"data": root / "data"}, tmp_path / "again", reuse=False)
    for name in ("encoder/model.safetensors", "llm/model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (root / "base" / name).read_bytes(), name
    other = apply_overrides(config, ["data.seed=7"])
    run_stage("base-models", other, {"data": root / "data"}, tmp_path / "other", reuse=False)
    assert (tmp_path / "other" / "encoder/model.safetensors").read_bytes() != (root / "base" / "encoder/model.safetensors").read_bytes()
