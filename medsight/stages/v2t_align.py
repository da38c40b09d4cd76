"""Stage 3: vision-to-text alignment. Only P_v2t trains; encoder, perceiver and LLM are frozen."""

from __future__ import annotations

from pathlib import Path

import torch

from medsight.config.schema import ExperimentConfig
from medsight.model.bundle import copy_modules, find_modules, stage_taxonomy
from medsight.model.factory import build_medsight
from medsight.stages.language_training import (
    llm_dtype,
    load_conversations,
    make_language_data,
    save_trained_modules,
    train_language_stage,
    validate_language,
)
from medsight.train import distributed
from medsight.train.tracker import Tracker

STAGE = "v2t-align"


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.v2t_align
    # The codebook and its region tokens do not exist yet at stage 3 (they join at stage 4, with
    # rows initialised from P_v2t): the alignment captions are trained on the base vocabulary.
    taxonomy = stage_taxonomy(config, inputs)
    # Seeded before the new modules are built: every rank (and every rerun) starts from the same
    # weights; ZeRO-3 partitions each rank's own copy, so they must agree.
    torch.manual_seed(stage.seed)
    model, tokenizer, _ = build_medsight(config, inputs, taxonomy, region_tokens=False, llm_dtype=llm_dtype(stage))
    # PubMedVision alignment as prepared by `medsight data prepare pubmedvision` (val carved there).
    prepared = Path(inputs["data"]) / "pubmedvision"
    train = load_conversations(prepared / "alignment_train.jsonl", inputs["data"])
    val = load_conversations(prepared / "alignment_val.jsonl", inputs["data"])
    data = make_language_data(config, model, tokenizer, train, val, taxonomy, stage.visual_cache_mb)
    result, engine = train_language_stage(
        stage=STAGE, model=model, data=data, train_config=stage, deepspeed_config=stage.deepspeed,
        output=output, tracker=tracker, seg_weight=0.0,
    )
    save_trained_modules(output, engine, model, ("v2t",), inputs, taxonomy)
    if distributed.is_main():
        copy_modules(find_modules(inputs), output, ("perceiver",))
    metrics = validate_language(model, data, stage.batch_size, engine, stage.num_workers)
    return {**metrics, "train_steps": float(result.steps), **{f"final_{k}": v for k, v in result.last_losses.items()}}
