"""Stage 5: unified instruction tuning. LLM, region-token rows, P_v2t and P_t2v train (LM + seg);
encoder and perceiver stay frozen. Data (App. C): the PubMedVision instruct sample prepared by
`medsight data prepare pubmedvision` (paper: 60K) + the grounding-data stage's codebook
conversations (paper: 12K images); validation: their val parts."""

from __future__ import annotations

from pathlib import Path

from medsight.config.schema import ExperimentConfig
from medsight.model.llm import save_llm
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

STAGE = "instruct-tune"


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.instruct_tune
    taxonomy = stage_taxonomy(config, inputs)
    model, tokenizer, loaded = build_medsight(config, inputs, taxonomy)
    data_root = Path(inputs["data"])
    grounding, prepared = Path(inputs["grounding"]), data_root / "pubmedvision"
    train = load_conversations(prepared / "instruct_train.jsonl", data_root)
    train += load_conversations(grounding / "instruct_conversations" / "train.json", data_root)
    val = load_conversations(prepared / "instruct_val.jsonl", data_root)
    val += load_conversations(grounding / "conversations" / "val.json", data_root)
    data = make_language_data(config, model, tokenizer, train, val, taxonomy, stage.visual_cache_mb)
    result = train_language_stage(
        stage=STAGE, model=model, data=data, train_config=stage, deepspeed_config=stage.deepspeed,
        output=output, tracker=tracker, seg_weight=1.0,
    )
    with gathered_parameters(model, stage.deepspeed.zero_stage):
        save_modules(output, {"t2v": model.t2v, "region_tokens": model.region_tokens, "v2t": model.v2t}, taxonomy)
        save_llm(model.llm, output / "llm")
    copy_modules(find_modules(inputs), output, ("perceiver", "codebook"))
    tokenizer.save_pretrained(str(output / "tokenizer"))
    metrics = validate_language(model, data, stage.batch_size)
    return {
        **metrics,
        "t2v_from_stage4": float("t2v" in loaded),
        "train_steps": float(result.steps),
        **{f"final_{k}": v for k, v in result.last_losses.items()},
    }
