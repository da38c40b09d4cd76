"""Stage 5: unified instruction tuning. LLM, region-token rows, P_v2t and P_t2v train (LM + seg);
encoder and perceiver stay frozen. Data: VQA instructions + grounding conversations."""

from __future__ import annotations

from pathlib import Path

from medsight.config.schema import ExperimentConfig
from medsight.model.llm import save_llm
from medsight.model.lora import attach_lora, merge_lora
from medsight.model.bundle import build_medsight, copy_modules, find_modules, save_modules, stage_taxonomy
from medsight.stages.language_training import (
    load_conversations,
    make_language_data,
    train_language_stage,
    validate_language,
)
from medsight.stages.zero_gather import gathered_parameters
from medsight.train.tracker import Tracker

STAGE = "instruct-tune"


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.instruct_tune
    taxonomy = stage_taxonomy(config, inputs)
    model, tokenizer, loaded = build_medsight(config, inputs, taxonomy)
    data_root = Path(inputs["data"])
    grounding = Path(inputs["grounding"]) / "conversations"
    train = load_conversations(data_root / "llava" / "instruct_train.json", data_root)
    train += load_conversations(grounding / "train.json", data_root)
    val = load_conversations(data_root / "llava" / "instruct_val.json", data_root)
    val += load_conversations(grounding / "val.json", data_root)
    data = make_language_data(config, model, tokenizer, train, val, taxonomy, stage.visual_cache_mb)
    # LoRA (App. F.4): adapters injected into the LLM in place; merged back before saving.
    lora = attach_lora(model.llm, stage) if stage.lora_rank > 0 else None
    result = train_language_stage(
        stage=STAGE, model=model, data=data, train_config=stage, deepspeed_config=stage.deepspeed,
        output=output, tracker=tracker, seg_weight=1.0, lora=lora is not None,
    )
    with gathered_parameters(model, stage.deepspeed.zero_stage):
        if lora is not None:
            model.llm = merge_lora(lora)
        save_modules(output, {"t2v": model.t2v, "region_tokens": model.region_tokens, "v2t": model.v2t}, taxonomy)
        save_llm(model.llm, output / "llm")
    copy_modules(find_modules(inputs), output, ("perceiver", "codebook"))
    tokenizer.save_pretrained(str(output / "tokenizer"))
    metrics = validate_language(model, data, stage.batch_size)
    return {
        **metrics,
        "t2v_from_stage4": float("t2v" in loaded),
        "lora_rank": float(stage.lora_rank),
        "train_steps": float(result.steps),
        **{f"final_{k}": v for k, v in result.last_losses.items()},
    }
