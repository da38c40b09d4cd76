"""The stage graph: one entry per stage, the single source of truth for the CLI, KFP and DVC.

The KFP pipeline (``pipelines/``) and ``dvc.yaml`` are both checked against this table in tests,
so the three can never drift apart.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from medsight.config.schema import ExperimentConfig
    from medsight.train.tracker import Tracker


class StageFn(Protocol):
    def __call__(
        self,
        config: ExperimentConfig,
        inputs: dict[str, Path],
        output: Path,
        tracker: Tracker,
    ) -> dict[str, float]: ...


@dataclass(frozen=True)
class StageSpec:
    name: str
    # "module:function" so listing stages never imports torch.
    entrypoint: str
    description: str
    required_inputs: tuple[str, ...] = ()
    # Inputs an ablation may leave out (e.g. "without stage 3" gives no v2t bundle).
    optional_inputs: tuple[str, ...] = ()
    # Config sections whose values change this stage's output (for cache keys / DVC params).
    config_sections: tuple[str, ...] = ()
    gpu: bool = False
    uses_deepspeed: bool = False
    metrics: tuple[str, ...] = field(default_factory=tuple)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.required_inputs + self.optional_inputs

    def load(self) -> StageFn:
        module_name, function_name = self.entrypoint.split(":")
        return getattr(importlib.import_module(module_name), function_name)


# data.taxonomy: the label space gives class and modality ids their meaning in every model stage.
_MODEL = ("preset", "data.taxonomy", "model.encoder", "model.perceiver")

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="synth-data",
        entrypoint="medsight.stages.synth_data:run",
        description="Generate the synthetic BiomedParse/PubMedVision-format dataset (tiny preset)",
        config_sections=("data",),
    ),
    StageSpec(
        name="base-models",
        entrypoint="medsight.stages.base_models:run",
        description="Tokenizer + encoder + LLM weights (trained tokenizer and random init for tiny, local weights for full)",
        required_inputs=("data",),
        config_sections=("preset", "model.encoder", "model.llm"),
    ),
    StageSpec(
        name="perceiver-pretrain",
        entrypoint="medsight.stages.perceiver_pretrain:run",
        description="Stage 1: Region Perceiver pre-training (Hungarian BCE+Dice+CE)",
        required_inputs=("data", "base"),
        config_sections=(*_MODEL, "model.loss", "perceiver_pretrain"),
        gpu=True,
        metrics=("val_dice",),
    ),
    StageSpec(
        name="codebook-pretrain",
        entrypoint="medsight.stages.codebook_pretrain:run",
        description="Stage 2: modality-aware VQ codebook (VQ + L2 + grounding loss)",
        required_inputs=("data", "base", "perceiver"),
        config_sections=(*_MODEL, "model.loss", "model.codebook", "codebook_pretrain"),
        gpu=True,
        metrics=("val_dice_quantized", "dice_retention", "min_codes_used_per_modality"),
    ),
    StageSpec(
        name="v2t-align",
        entrypoint="medsight.stages.v2t_align:run",
        description="Stage 3: vision-to-text projector alignment (LM loss, LLM frozen)",
        required_inputs=("data", "base", "perceiver"),
        config_sections=(*_MODEL, "model.llm", "model.region_embeddings", "v2t_align"),
        gpu=True,
        uses_deepspeed=True,
        metrics=("val_lm_loss",),
    ),
    StageSpec(
        name="grounding-data",
        entrypoint="medsight.stages.grounding_data:run",
        description="Ground-truth regions -> region tokens (Hungarian to quantized queries) -> grounding conversations",
        required_inputs=("data", "base", "codebook"),
        config_sections=(*_MODEL, "model.codebook", "model.grounding", "grounding_data"),
    ),
    StageSpec(
        name="t2v-align",
        entrypoint="medsight.stages.t2v_align:run",
        description="Stage 4: text-to-vision projector + region token embeddings (LM + seg loss)",
        required_inputs=("data", "base", "codebook", "grounding"),
        optional_inputs=("v2t",),
        config_sections=(*_MODEL, "model.llm", "model.codebook", "model.region_embeddings", "model.grounding", "t2v_align"),
        gpu=True,
        uses_deepspeed=True,
        metrics=("val_lm_loss", "val_seg_dice"),
    ),
    StageSpec(
        name="instruct-tune",
        entrypoint="medsight.stages.instruct_tune:run",
        description="Stage 5: unified instruction tuning (LLM + region embeddings + projectors)",
        required_inputs=("data", "base", "codebook", "grounding"),
        optional_inputs=("v2t", "t2v"),
        config_sections=(*_MODEL, "model.llm", "model.codebook", "model.region_embeddings", "model.grounding", "instruct_tune"),
        gpu=True,
        uses_deepspeed=True,
        metrics=("val_lm_loss", "val_seg_dice"),
    ),
    StageSpec(
        name="evaluate",
        entrypoint="medsight.eval.stage:run",
        description="Evaluation: VQA accuracy/recall, DiagSeg recall + Dice, grounding Dice, report",
        required_inputs=("data", "base", "model", "grounding"),
        config_sections=("data.taxonomy", "evaluate"),
        gpu=True,
        metrics=("closed_accuracy", "open_recall", "seg_dice"),
    ),
)


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")
