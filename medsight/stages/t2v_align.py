"""Stage 4: text-to-vision alignment. P_t2v and the region-token rows train (LM + seg loss);
encoder, perceiver, LLM and P_v2t stay frozen. Region tokens start at P_v2t(P_d(e))."""

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

STAGE = "t2v-align"


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.t2v_align
    taxonomy = stage_taxonomy(config, inputs)
    # Seeded before the new modules are built: every rank (and every rerun) starts from the same
    # weights; ZeRO-3 partitions each rank's own copy, so they must agree.
    torch.manual_seed(stage.seed)
    model, tokenizer, loaded = build_medsight(config, inputs, taxonomy, llm_dtype=llm_dtype(stage))
    grounding = Path(inputs["grounding"]) / "conversations"
    train = load_conversations(grounding / "train.json", inputs["data"])
    val = load_conversations(grounding / "val.json", inputs["data"])
    data = make_language_data(config, model, tokenizer, train, val, taxonomy, stage.visual_cache_mb)
    result, engine = train_language_stage(
        stage=STAGE, model=model, data=data, train_config=stage, deepspeed_config=stage.deepspeed,
        output=output, tracker=tracker, seg_weight=1.0,
    )
    save_trained_modules(output, engine, model, ("t2v", "region_tokens", "v2t"), inputs, taxonomy)
    if distributed.is_main():
        copy_modules(find_modules(inputs), output, ("perceiver", "codebook"))
        tokenizer.save_pretrained(str(output / "tokenizer"))
    metrics = validate_language(model, data, stage.batch_size, engine, stage.num_workers)
    return {
        **metrics,
        "v2t_from_stage3": float("v2t" in loaded),
        "train_steps": float(result.steps),
        **{f"final_{k}": v for k, v in result.last_losses.items()},
    }
