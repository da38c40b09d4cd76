"""Stage 5: unified instruction tuning. LLM, region-token rows, P_v2t and P_t2v train (LM + seg);
encoder and perceiver stay frozen. Data (App. C): the PubMedVision instruct sample prepared by
`medsight data prepare pubmedvision` (paper: 60K) + the grounding-data stage's codebook
conversations (paper: 12K images); validation: their val parts."""

from __future__ import annotations

from pathlib import Path

import torch

from medsight.config.schema import ExperimentConfig
from medsight.model.bundle import copy_modules, find_modules, stage_taxonomy
from medsight.model.factory import build_medsight
from medsight.model.lora import attach_lora
from medsight.stages.language_training import (
    llm_dtype,
    load_conversations,
    make_language_data,
    save_trained_llm,
    save_trained_modules,
    train_language_stage,
    validate_language,
)
from medsight.train import distributed
from medsight.train.tracker import Tracker

STAGE = "instruct-tune"


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.instruct_tune
    taxonomy = stage_taxonomy(config, inputs)
    # Seeded before the new modules are built: every rank (and every rerun) starts from the same
    # weights; ZeRO-3 partitions each rank's own copy, so they must agree.
    torch.manual_seed(stage.seed)
    model, tokenizer, loaded = build_medsight(config, inputs, taxonomy, llm_dtype=llm_dtype(stage))
    data_root = Path(inputs["data"])
    grounding, prepared = Path(inputs["grounding"]), data_root / "pubmedvision"
    train = load_conversations(prepared / "instruct_train.jsonl", data_root)
    train += load_conversations(grounding / "instruct_conversations" / "train.json", data_root)
    val = load_conversations(prepared / "instruct_val.jsonl", data_root)
    val += load_conversations(grounding / "conversations" / "val.json", data_root)
    data = make_language_data(config, model, tokenizer, train, val, taxonomy, stage.visual_cache_mb)
    # LoRA (App. F.4): adapters injected into the LLM in place; folded back in when it is saved.
    lora = attach_lora(model.llm, stage) if stage.lora_rank > 0 else None
    result, engine = train_language_stage(
        stage=STAGE, model=model, data=data, train_config=stage, deepspeed_config=stage.deepspeed,
        output=output, tracker=tracker, seg_weight=1.0, lora=lora is not None,
    )
    save_trained_modules(output, engine, model, ("t2v", "region_tokens", "v2t"), inputs, taxonomy)
    save_trained_llm(output, engine, model, llm_dtype(stage), lora)
    if distributed.is_main():
        copy_modules(find_modules(inputs), output, ("perceiver", "codebook"))
        tokenizer.save_pretrained(str(output / "tokenizer"))
    metrics = validate_language(model, data, stage.batch_size, engine, stage.num_workers)
    return {
        **metrics,
        "t2v_from_stage4": float("t2v" in loaded),
        "lora_rank": float(stage.lora_rank),
        "train_steps": float(result.steps),
        **{f"final_{k}": v for k, v in result.last_losses.items()},
    }
