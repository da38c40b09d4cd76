"""Stage 3: vision-to-text alignment. Only P_v2t trains; encoder, perceiver and LLM are frozen."""

from __future__ import annotations

from pathlib import Path

from medsight.config.schema import ExperimentConfig
from medsight.model.bundle import copy_modules, find_modules, save_modules, stage_taxonomy
from medsight.model.factory import build_medsight
from medsight.stages.language_training import (
    load_conversations,
    make_language_data,
    train_language_stage,
    validate_language,
)
from medsight.stages.zero_gather import gathered_parameters
from medsight.train.tracker import Tracker

STAGE = "v2t-align"


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.v2t_align
    # The codebook and its region tokens do not exist yet at stage 3 (they join at stage 4, with
    # rows initialised from P_v2t): the alignment captions are trained on the base vocabulary.
    taxonomy = stage_taxonomy(config, inputs)
    model, tokenizer, _ = build_medsight(config, inputs, taxonomy, region_tokens=False)
    # PubMedVision alignment as prepared by `medsight data prepare pubmedvision` (val carved there).
    prepared = Path(inputs["data"]) / "pubmedvision"
    train = load_conversations(prepared / "alignment_train.jsonl", inputs["data"])
    val = load_conversations(prepared / "alignment_val.jsonl", inputs["data"])
    data = make_language_data(config, model, tokenizer, train, val, taxonomy, stage.visual_cache_mb)
    result = train_language_stage(
        stage=STAGE, model=model, data=data, train_config=stage, deepspeed_config=stage.deepspeed,
        output=output, tracker=tracker, seg_weight=0.0,
    )
    with gathered_parameters(model, stage.deepspeed.zero_stage):
        save_modules(output, {"v2t": model.v2t}, taxonomy)
    copy_modules(find_modules(inputs), output, ("perceiver",))
    metrics = validate_language(model, data, stage.batch_size)
    return {**metrics, "train_steps": float(result.steps), **{f"final_{k}": v for k, v in result.last_losses.items()}}
