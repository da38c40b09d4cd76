"""End to end at tiny widths: a fabricated authors-format release (every file in its real layout)
is imported with ``medsight import authors``, then the imported bundles are what the platform's
stages read: grounding data from the imported codebook, ``medsight predict`` with masks, the
evaluate stage, and stage 5 (its LoRA variant) fine-tuned from the imported model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medsight.config import load_config
from medsight.config.schema import DataConfig
from medsight.data.prepared_index import read_split
from medsight.data.synthetic import generate_dataset
from medsight.data.taxonomy import Taxonomy
from medsight.importers.cli import import_app
from medsight.model.encoder import ImageEncoder
from medsight.model.llm import load_llm
from medsight.stages.runner import run_stage
from tests.authors_fakes import (
    codebook_key_shapes,
    fabricate_final_model,
    perceiver_key_shapes,
    projector_key_shapes,
    random_state,
    save_projector,
    save_vq_train_checkpoint,
)

# Tiny widths: perceiver width = the tiny encoder's 64, 2 heads of 8, 2 layers (8 -> 16 -> 32 px).
DIMS = dict(dim=64, heads=2, head_dim=8, ffn=128, queries=4, layers=2, codes=3, code_dim=16)
HIDDEN = 32
IMPORT_SETTINGS = ["--preset", "tiny", "--set", "model.encoder.image_size=32", "--set", "data.image_size=32",
                   "--set", "model.perceiver.head_dim=8", "--feature-layer", "-2"]


def fabricate_release(root: Path, taxonomy: Taxonomy) -> dict[str, Path]:
    root.mkdir(parents=True)
    classes, modalities = len(taxonomy.region_classes), len(taxonomy.modalities)
    perceiver = random_state(perceiver_key_shapes(classes=classes, **DIMS), seed=11)
    codebook = random_state(codebook_key_shapes(classes=classes, modalities=modalities, **DIMS), seed=12)
    files = {
        "perceiver": save_vq_train_checkpoint(root / "0079280.pt", {f"region_perceiver.{k}": v for k, v in perceiver.items()}),
        "codebook": save_vq_train_checkpoint(root / "codebook.pt", codebook, steps=3000),
        "projector": save_projector(root / "mm_projector.bin", random_state(projector_key_shapes(DIMS["dim"], HIDDEN), seed=13)),
    }
    fabricate_final_model(root / "medsight_full_instruct", hidden=HIDDEN, perceiver_dim=DIMS["dim"],
                          modalities=modalities, codes=DIMS["codes"], emit_region_tokens=True)
    files["model"] = root / "medsight_full_instruct"
    # UniMed-CLIP layout around a tiny ViT (the tiny preset's encoder at 32 px).
    config = load_config_for_encoder()
    visual = ImageEncoder.random_init(config).visual.state_dict()
    state = {f"module.visual.{k}": v for k, v in visual.items()}
    state.update({"module.text_encoder.proj.0.weight": torch.zeros(4, 4), "module.logit_scale": torch.tensor(4.6)})
    torch.save({"epoch": 1, "state_dict": state}, root / "unimed_clip.pt")
    files["encoder"] = root / "unimed_clip.pt"
    return files


def load_config_for_encoder():
    from medsight.config import apply_overrides, get_preset

    return apply_overrides(get_preset("tiny"), ["model.encoder.image_size=32"]).model.encoder


@pytest.mark.slow
def test_import_then_predict_evaluate_and_finetune(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, DataConfig(train_images=6, val_images=2, test_images=4, image_size=32, seed=4))
    taxonomy = Taxonomy.load(data / "taxonomy.json")
    files = fabricate_release(tmp_path / "release", taxonomy)
    out = tmp_path / "imported"

    args = ["authors", "--out", str(out), "--taxonomy", str(data / "taxonomy.json"), *IMPORT_SETTINGS]
    for name in ("perceiver", "codebook", "projector", "model", "encoder"):
        args += [f"--{name}", str(files[name])]
    result = CliRunner().invoke(import_app, args)
    assert result.exit_code == 0, result.output
    assert "2 x a LayerNorm the released forward pass never applies" in result.output
    stages = ("base-models", "perceiver-pretrain", "codebook-pretrain", "v2t-align", "instruct-tune")
    for stage in stages:
        record = json.loads((out / stage / "stage.json").read_text())
        assert record["stage"] == stage and record["inputs"] == {} and len(record["fingerprint"]) == 64
        assert str(files["perceiver"].resolve()) in record["imported_from"] or stage == "base-models"
        assert Taxonomy.load(out / stage / "modules" / "taxonomy.json") == taxonomy
    final = out / "instruct-tune"
    config = load_config(final / "config.yaml")
    assert (config.model.perceiver.architecture, config.model.codebook.architecture) == ("authors", "authors")
    assert (config.model.llm.prompt_format, config.model.llm.image_token) == ("chat_template", "<|image_pad|>")
    assert config.model.encoder.feature_layer == -2 and config.evaluate.protocol == "llava-med"
    name_map = json.loads((final / "modules" / "region_token_map.json").read_text())["authors_to_platform"]
    assert name_map["[M0_1]"] == "[C0_1]"

    # A second import into the same folder is refused without --force (nothing overwritten).
    again = CliRunner().invoke(import_app, args)
    assert again.exit_code == 2 and "exists and is not empty" in again.output

    # Grounding data from the imported perceiver + codebook (the authors' quantized-query head).
    stage_config = load_config(final / "config.yaml")
    bundles = {"data": data, "base": out / "base-models"}
    run_stage("grounding-data", stage_config, {**bundles, "codebook": out / "codebook-pretrain"}, tmp_path / "grounding")
    grounding = json.loads((tmp_path / "grounding" / "conversations" / "train.json").read_text())
    assert any("[C" in turn["value"] for item in grounding for turn in item["conversations"])

    # medsight predict: every generated token is a region token here, each decoded to a mask by
    # re-running the imported perceiver with it as a query.
    predicted = CliRunner().invoke(_predict_app(), [
        "--checkpoint", str(final), "--base", str(out / "base-models"), "--image", str(read_split(data, "test", taxonomy)[0].image_path),
        "--question", "Where is the lesion?", "--out", str(tmp_path / "pred"), "--max-new-tokens", "3",
    ])
    assert predicted.exit_code == 0, predicted.output
    summary = json.loads((tmp_path / "pred" / "prediction.json").read_text())
    assert len(summary["region_tokens"]) == 3 and set(summary["region_tokens"]) <= {"[C0_0]", "[C0_1]"}
    assert all((tmp_path / "pred" / region["mask"]).is_file() for region in summary["regions"])

    # The evaluate stage on the imported model, both protocols in its results.
    stage_config.evaluate.max_new_tokens = 2
    stage_config.evaluate.report_samples = 1
    metrics = run_stage("evaluate", stage_config, {**bundles, "model": final, "grounding": tmp_path / "grounding"}, tmp_path / "eval").metrics
    assert "closed_accuracy_llava_med" in metrics and 0.0 <= metrics["seg_dice"] <= 1.0
    assert (tmp_path / "eval" / "report.html").is_file()

    # Stage 5, LoRA variant, fine-tuned from the imported model for two steps.
    tune = load_config(final / "config.yaml")
    tune.instruct_tune.max_steps, tune.instruct_tune.batch_size, tune.instruct_tune.lora_rank = 2, 2, 4
    tune.instruct_tune.visual_cache_mb = 0
    metrics = run_stage("instruct-tune", tune, {**bundles, "codebook": out / "codebook-pretrain", "grounding": tmp_path / "grounding", "t2v": final}, tmp_path / "tuned").metrics
    assert metrics["train_steps"] == 2 and metrics["lora_rank"] == 4 and torch.isfinite(torch.tensor(metrics["val_lm_loss"]))
    before = load_llm(final / "llm", tune.model.llm).state_dict()
    after = load_llm(tmp_path / "tuned" / "llm", tune.model.llm).state_dict()
    assert set(after) == set(before)  # adapters merged away: a plain model again
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # only LoRA-targeted layers moved
    # The in-process DeepSpeed stages left no rank variables behind for later child processes.
    import os

    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ


def _predict_app():
    import typer

    from medsight.eval.cli import predict_command

    app = typer.Typer()
    app.command()(predict_command)
    return app


def test_a_stage_in_process_leaves_no_rank_variables(tmp_path, monkeypatch):
    """A single-process DeepSpeed stage sets RANK/WORLD_SIZE/MASTER_* for its one-rank group; a
    later child process that inherited them would take itself for a torchrun rank."""
    import os

    from medsight.train import distributed

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with distributed.process_group():
        from medsight.train.engine import ensure_distributed_env

        ensure_distributed_env()
        assert os.environ["WORLD_SIZE"] == "1"
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)
