"""The stage graph: the one place stages, their edges, skip rules, config views and variants live.

Everything else derives from this table:
- the in-process chain (``chain.py``) walks it;
- the KFP components are generated from it (``components/``) and the pipeline wires them by it
  (``pipelines/``);
- ``dvc.yaml`` and ``params.yaml`` are rendered from it (``medsight platform dvc-files``);
- each stage's cache key is the hash of its config view (``reads``), its inputs' content hashes
  and its code (``cache_key.py``), the same for the chain, KFP and DVC.

Adding a stage or an ablation variant means adding one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, Protocol

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


# Where a stage runs: a CPU pod, the GPUs of one pod (DDP for stages 1-2), or a DeepSpeed pod.
# pipelines/deployment.py turns a class into node pool, GPU count and host resources.
ResourceClass = Literal["cpu", "gpu", "gpu-deepspeed"]
# What a stage hands downstream; the KFP artifact type of its output.
OutputKind = Literal["dataset", "model", "evaluation", "report"]


@dataclass(frozen=True)
class StageInput:
    """One input of a stage: the upstream stage whose output it reads."""

    source: str
    # An ablation may drop ``source``; the stage then runs without this input.
    optional: bool = False
    # Or, when ``source`` is dropped, read this stage's output instead ("without stage 5":
    # evaluate the stage-4 model as it is).
    fallback: str | None = None


@dataclass(frozen=True)
class StageSpec:
    name: str
    # "module:function", so listing stages never imports torch.
    entrypoint: str
    description: str
    inputs: Mapping[str, StageInput] = field(default_factory=dict)
    # The config view: every config field (or whole section) the stage reads. Its values are
    # the stage's config part of the cache key; tests/test_stage_views.py records the reads of a
    # tiny run and fails when a stage reads a field outside its view.
    reads: tuple[str, ...] = ()
    resources: ResourceClass = "cpu"
    output: OutputKind = "model"
    # Skip rule: an ablation variant may drop this stage.
    droppable: bool = False
    metrics: tuple[str, ...] = ()
    # Stages that must have finished first without being read (a gate, such as the data check).
    after: tuple[str, ...] = ()
    # A file of the output that the KFP run page shows as the stage's card (else a summary card).
    card: str = ""
    # The stage talks to MLflow itself (the model registry): its tracking run is opened in its own
    # process, where MLflow is loaded anyway, not in a helper (platform/tracking_process.py).
    uses_mlflow: bool = False

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return tuple(name for name, spec in self.inputs.items() if not spec.optional)

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        return tuple(name for name, spec in self.inputs.items() if spec.optional)

    @property
    def uses_deepspeed(self) -> bool:
        return self.resources == "gpu-deepspeed"

    @property
    def gpu(self) -> bool:
        return self.resources != "cpu"

    def load(self) -> StageFn:
        module_name, function_name = self.entrypoint.split(":")
        return getattr(importlib.import_module(module_name), function_name)


def _inputs(**sources: StageInput | str) -> Mapping[str, StageInput]:
    return MappingProxyType({name: s if isinstance(s, StageInput) else StageInput(s) for name, s in sources.items()})


# Config views. Whole sections where a stage reads (nearly) all of one; single fields where a
# field is read by a later stage but not by the one that built its input. A field an upstream
# stage already reads may be over-included harmlessly: changing it changes that input anyway.
_LLM_ARCHITECTURE = tuple(f"model.llm.{name}" for name in (
    "backbone", "weights_path", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
    "intermediate_size", "max_position_embeddings", "tokenizer_vocab_size"))
_VISION = ("data.taxonomy", "model.encoder", "model.perceiver")
# The region vocabulary's size and kind (stages that build the LLM side but train no codebook).
_VOCABULARY = tuple(f"model.codebook.{name}" for name in ("architecture", "num_modalities", "codes_per_modality",
                                                           "code_dim", "modality_predictor")) + ("model.grounding",)
# Stage 3 has no region tokens yet; num_modalities only for the label-space check.
_ALIGNMENT = (*_VISION, "model.codebook.num_modalities", "model.region_embeddings", "model.patch_merge",
              "model.t2v_activation", "model.llm.backbone", "model.llm.gradient_checkpointing",
              "model.llm.max_position_embeddings", "model.llm.prompt_format", "model.llm.image_token",
              "model.llm.system_prompt")
_LANGUAGE = (*_ALIGNMENT, *_VOCABULARY)
_SEG_LOSS = ("model.loss.bce_weight", "model.loss.dice_weight")
_MATCHING = ("model.loss.match_bce", "model.loss.match_dice", "model.loss.match_class")

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="synth-data",
        entrypoint="medsight.stages.synth_data:run",
        description="Generate the synthetic BiomedParse/PubMedVision-format dataset (tiny preset)",
        # Leaves, not the section: data.too_many_masks is read by the segmentation stages only.
        reads=("data.source", "data.image_size", "data.train_images", "data.val_images", "data.test_images",
               "data.seed"),
        output="dataset",
    ),
    StageSpec(
        name="data-check",
        entrypoint="medsight.stages.data_check:run",
        description="Data quality report of the prepared dataset; stops the run when too much of it is bad",
        inputs=_inputs(data="synth-data"),
        reads=("data.max_bad_fraction",),
        output="report",
        card="quality.html",
    ),
    StageSpec(
        name="base-models",
        entrypoint="medsight.stages.base_models:run",
        description="Tokenizer + encoder + LLM weights (trained tokenizer and random init for tiny, local weights for full)",
        inputs=_inputs(data="synth-data"),
        after=("data-check",),
        reads=("data.seed", "model.encoder", *_LLM_ARCHITECTURE),
    ),
    StageSpec(
        name="perceiver-pretrain",
        entrypoint="medsight.stages.perceiver_pretrain:run",
        description="Stage 1: Region Perceiver pre-training (Hungarian BCE+Dice+CE)",
        inputs=_inputs(data="synth-data", base="base-models"),
        # num_modalities: the stage refuses a config whose counts disagree with the data.
        reads=(*_VISION, "model.loss", "model.codebook.num_modalities", "perceiver_pretrain", "data.too_many_masks"),
        resources="gpu",
        metrics=("val_dice",),
    ),
    StageSpec(
        name="codebook-pretrain",
        entrypoint="medsight.stages.codebook_pretrain:run",
        description="Stage 2: modality-aware VQ codebook (VQ + L2 + grounding loss)",
        inputs=_inputs(data="synth-data", base="base-models", perceiver="perceiver-pretrain"),
        reads=(*_VISION, "model.loss", "model.codebook", "codebook_pretrain", "data.too_many_masks"),
        resources="gpu",
        metrics=("val_dice_quantized", "dice_retention", "min_codes_used_per_modality"),
    ),
    StageSpec(
        name="v2t-align",
        entrypoint="medsight.stages.v2t_align:run",
        description="Stage 3: vision-to-text projector alignment (LM loss, LLM frozen)",
        inputs=_inputs(data="synth-data", base="base-models", perceiver="perceiver-pretrain"),
        reads=(*_ALIGNMENT, "v2t_align"),
        resources="gpu-deepspeed",
        droppable=True,
        metrics=("val_lm_loss",),
    ),
    StageSpec(
        name="grounding-data",
        entrypoint="medsight.stages.grounding_data:run",
        description="Ground-truth regions -> region tokens (Hungarian to quantized queries) -> grounding conversations",
        inputs=_inputs(data="synth-data", base="base-models", codebook="codebook-pretrain"),
        reads=(*_VISION, "model.codebook", "model.grounding", *_MATCHING, "grounding_data",
               "codebook_pretrain.max_masks_per_image", "codebook_pretrain.num_workers", "data.too_many_masks"),
        output="dataset",
    ),
    StageSpec(
        name="t2v-align",
        entrypoint="medsight.stages.t2v_align:run",
        description="Stage 4: text-to-vision projector + region token embeddings (LM + seg loss)",
        inputs=_inputs(data="synth-data", base="base-models", codebook="codebook-pretrain",
                       grounding="grounding-data", v2t=StageInput("v2t-align", optional=True)),
        reads=(*_LANGUAGE, *_SEG_LOSS, "t2v_align"),
        resources="gpu-deepspeed",
        droppable=True,
        metrics=("val_lm_loss", "val_seg_dice"),
    ),
    StageSpec(
        name="instruct-tune",
        entrypoint="medsight.stages.instruct_tune:run",
        description="Stage 5: unified instruction tuning (LLM + region embeddings + projectors)",
        inputs=_inputs(data="synth-data", base="base-models", codebook="codebook-pretrain",
                       grounding="grounding-data", v2t=StageInput("v2t-align", optional=True),
                       t2v=StageInput("t2v-align", optional=True)),
        reads=(*_LANGUAGE, *_SEG_LOSS, "instruct_tune"),
        resources="gpu-deepspeed",
        droppable=True,
        metrics=("val_lm_loss", "val_seg_dice"),
    ),
    StageSpec(
        name="evaluate",
        entrypoint="medsight.eval.stage:run",
        description="Evaluation: VQA accuracy/recall, DiagSeg recall + Dice, grounding Dice, report",
        inputs=_inputs(data="synth-data", base="base-models",
                       model=StageInput("instruct-tune", fallback="t2v-align"), grounding="grounding-data"),
        # The model's own settings come with its bundle (config.yaml), hashed as an input.
        reads=("data.taxonomy", "evaluate", "preset"),
        resources="gpu",
        output="evaluation",
        metrics=("closed_accuracy", "open_recall", "seg_dice"),
        card="report.html",
    ),
    StageSpec(
        name="register-model",
        entrypoint="medsight.stages.register:run",
        description="Register the evaluated model in the MLflow model registry when it clears the thresholds",
        inputs=_inputs(evaluation="evaluate", model=StageInput("instruct-tune", fallback="t2v-align"),
                       base="base-models"),
        reads=("register",),
        output="report",
        metrics=("registered",),
        uses_mlflow=True,
    ),
)


@dataclass(frozen=True)
class Variant:
    """A named ablation: config overrides plus the stages it drops (DESIGN.md, App. F)."""

    name: str
    description: str
    overrides: tuple[str, ...] = ()
    drops: frozenset[str] = frozenset()


VARIANTS: tuple[Variant, ...] = (
    Variant("full", "MedSIGHT as configured (reference row)"),
    Variant("no-region-embeddings", "no region embeddings in the LLM input (Table 5 row 2)",
            ("model.region_embeddings=false",)),
    Variant("seg-token", "one [SEG] token instead of the region codebook", ("model.grounding=seg_token",)),
    Variant("without-stage-3", "without vision-to-text alignment (stage 3)", drops=frozenset({"v2t-align"})),
    Variant("without-stage-4", "without text-to-vision alignment (stage 4)", drops=frozenset({"t2v-align"})),
    Variant("without-stage-5", "without unified instruction tuning (stage 5)", drops=frozenset({"instruct-tune"})),
    Variant("codebook-8", "8 codes per modality (App. F.8)", ("model.codebook.codes_per_modality=8",)),
    Variant("codebook-16", "16 codes per modality", ("model.codebook.codes_per_modality=16",)),
    Variant("codebook-32", "32 codes per modality", ("model.codebook.codes_per_modality=32",)),
    Variant("codebook-64", "64 codes per modality", ("model.codebook.codes_per_modality=64",)),
    Variant("one-way-decoder", "query-to-image only decoder, no dual cross-attention (App. F.7)",
            ("model.perceiver.two_way=false",)),
    Variant("qwen2-backbone", "Qwen2 LLM backbone instead of Qwen3 (App. F.6)", ("model.llm.backbone=qwen2",)),
    Variant("lora", "stage 5 trains rank-32 LoRA adapters on every linear layer of the LLM instead of all of it (App. F.4)",
            ("instruct_tune.lora_rank=32",)),
)


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def get_variant(name: str) -> Variant:
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise KeyError(f"unknown variant {name!r}; variants: {', '.join(v.name for v in VARIANTS)}")


def evaluation_stage() -> StageSpec:
    """The stage whose output is the evaluation (report, metrics) of a variant."""
    return next(spec for spec in STAGES if spec.output == "evaluation")


class GraphError(ValueError):
    """A variant leaves a stage without an input it needs; the message names both."""


def input_sources(spec: StageSpec, dropped: frozenset[str] = frozenset()) -> dict[str, str]:
    """Input name -> the stage whose output feeds it, once ``dropped`` stages are gone.

    An optional input whose source is dropped is left out; a fallback replaces a dropped
    source; a required input without either is a ``GraphError``.
    """
    sources: dict[str, str] = {}
    for name, wanted in spec.inputs.items():
        source = wanted.source
        if source in dropped and wanted.fallback is not None:
            source = wanted.fallback
        if source in dropped:
            if wanted.optional:
                continue
            raise GraphError(f"stage {spec.name} needs input {name!r} from {source}, which is dropped")
        sources[name] = source
    return sources


def active_stages(dropped: frozenset[str] = frozenset()) -> list[StageSpec]:
    """The stages that run when ``dropped`` are left out, in dependency order (validated)."""
    unknown = sorted(dropped - {s.name for s in STAGES})
    if unknown:
        raise GraphError(f"unknown stage {unknown[0]!r}; stages: {', '.join(s.name for s in STAGES)}")
    not_droppable = sorted(name for name in dropped if not get_stage(name).droppable)
    if not_droppable:
        droppable = ", ".join(s.name for s in STAGES if s.droppable)
        raise GraphError(f"stage {not_droppable[0]} cannot be dropped; droppable stages: {droppable}")
    active = [spec for spec in STAGES if spec.name not in dropped]
    for spec in active:
        input_sources(spec, dropped)
    return active


def graph_edges(dropped: frozenset[str] = frozenset()) -> set[tuple[str, str]]:
    """(upstream, downstream) edges of the graph without ``dropped``: data edges and ``after`` gates."""
    active = active_stages(dropped)
    names = {spec.name for spec in active}
    data = {(source, spec.name) for spec in active for source in input_sources(spec, dropped).values()}
    return data | {(gate, spec.name) for spec in active for gate in spec.after if gate in names}


def validate_registry() -> None:
    """Checks a new entry must pass: names unique, sources upstream, every variant resolvable."""
    seen: set[str] = set()
    for spec in STAGES:
        if spec.name in seen:
            raise GraphError(f"stage {spec.name} is registered twice")
        for name, wanted in spec.inputs.items():
            for source in filter(None, (wanted.source, wanted.fallback)):
                if source not in seen:
                    raise GraphError(f"stage {spec.name}: input {name!r} reads {source}, which is not upstream of it")
        for gate in spec.after:
            if gate not in seen:
                raise GraphError(f"stage {spec.name}: runs after {gate}, which is not upstream of it")
        seen.add(spec.name)
    if [spec.output for spec in STAGES].count("evaluation") != 1:
        raise GraphError("exactly one stage must produce the evaluation")
    names = [v.name for v in VARIANTS]
    if len(names) != len(set(names)):
        raise GraphError("two variants share a name")
    for variant in VARIANTS:
        try:
            active_stages(variant.drops)
        except GraphError as error:
            raise GraphError(f"variant {variant.name}: {error}") from error
