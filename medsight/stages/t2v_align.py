"""Stage 4: text-to-vision alignment. P_t2v and the region-token rows train (LM + seg loss);
encoder, perceiver, LLM and P_v2t stay frozen. Region tokens start at P_v2t(P_d(e))."""

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

STAGE = "t2v-align"


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.t2v_align
    taxonomy = stage_taxonomy(config, inputs)
    model, tokenizer, loaded = build_medsight(config, inputs, taxonomy)
    grounding = Path(inputs["grounding"]) / "conversations"
    train = load_conversations(grounding / "train.json", inputs["data"])
    val = load_conversations(grounding / "val.json", inputs["data"])
    data = make_language_data(config, model, tokenizer, train, val, taxonomy, stage.visual_cache_mb)
    result = train_language_stage(
        stage=STAGE, model=model, data=data, train_config=stage, deepspeed_config=stage.deepspeed,
        output=output, tracker=tracker, seg_weight=1.0,
    )
    with gathered_parameters(model, stage.deepspeed.zero_stage):
        save_modules(output, {"t2v": model.t2v, "region_tokens": model.region_tokens, "v2t": model.v2t}, taxonomy)
    copy_modules(find_modules(inputs), output, ("perceiver", "codebook"))
    tokenizer.save_pretrained(str(output / "tokenizer"))
    metrics = validate_language(model, data, stage.batch_size)
    return {
        **metrics,
        "v2t_from_stage3": float("v2t" in loaded),
        "train_steps": float(result.steps),
        **{f"final_{k}": v for k, v in result.last_losses.items()},
    }
