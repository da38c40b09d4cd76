"""The valid range of every config field, declared once, checked at load and on every ``--set``.

A value outside its range is a usage error naming the key and the range (``lr=0``, ``epochs=-5``,
``batch_size=0``, ``checkpoint_every=0`` used to train nothing, spin forever or end in a
ZeroDivisionError). Declarations are per dataclass and inherited: ``TrainConfig.lr`` covers
``perceiver_pretrain.lr`` and every other stage's ``lr``. A test checks that every numeric and
string field of the schema has a declaration, so a new field cannot skip this.

Relations between fields (a patch size that divides the image size, heads that divide a width)
are declared below the ranges, each with the keys it names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from medsight.config import schema as s


@dataclass(frozen=True)
class Range:
    """Bounds of a number (each optional; ``gt``/``lt`` exclusive, ``ge``/``le`` inclusive) or the
    allowed values of a string. For a tuple field it applies to each item."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    # A string field that may hold any text (a path, a name): declared so none is forgotten.
    free_text: bool = False

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.free_text:
            return "any text"
        low = f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}" if self.ge is not None else ""
        high = f"< {self.lt:g}" if self.lt is not None else f"<= {self.le:g}" if self.le is not None else ""
        return " and ".join(part for part in (low, high) if part) or "any number"

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True  # Optional fields: None means "not set"
        if self.choices:
            return value in self.choices
        if isinstance(value, str):
            return self.free_text
        if isinstance(value, bool):
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )


POSITIVE = Range(gt=0)
AT_LEAST_1 = Range(ge=1)
NON_NEGATIVE = Range(ge=0)
FRACTION = Range(ge=0, lt=1)
PROBABILITY = Range(gt=0, lt=1)
ANY_TEXT = Range(free_text=True)

# One declaration per field; subclasses inherit their base's (TrainConfig covers every stage).
RANGES: dict[type, dict[str, Range]] = {
    s.EncoderConfig: {
        "model_name": ANY_TEXT, "weights_path": ANY_TEXT,
        "image_size": AT_LEAST_1, "patch_size": AT_LEAST_1, "width": AT_LEAST_1, "layers": AT_LEAST_1,
        "heads": AT_LEAST_1, "feature_layer": Range(ge=-64, le=64),
        "embed_dim": NON_NEGATIVE,  # 0 = the width
        "mean": Range(ge=0, le=1), "std": POSITIVE,
    },
    s.PerceiverConfig: {
        "num_queries": AT_LEAST_1, "dim": AT_LEAST_1, "num_layers": AT_LEAST_1, "num_heads": AT_LEAST_1,
        "ffn_dim": AT_LEAST_1, "dropout": FRACTION, "upsample_factors": AT_LEAST_1,
        # 0 = taken from the prepared dataset's taxonomy (the full preset's default).
        "mask_threshold": PROBABILITY, "num_classes": NON_NEGATIVE,
        "architecture": Range(choices=s.PERCEIVER_ARCHITECTURES), "head_dim": NON_NEGATIVE,  # 0 = dim / heads
    },
    s.LossConfig: {
        "bce_weight": NON_NEGATIVE, "dice_weight": NON_NEGATIVE, "class_weight": NON_NEGATIVE,
        "no_object_weight": NON_NEGATIVE, "match_bce": NON_NEGATIVE, "match_dice": NON_NEGATIVE,
        "match_class": NON_NEGATIVE,
    },
    s.CodebookConfig: {
        "num_modalities": NON_NEGATIVE, "codes_per_modality": AT_LEAST_1, "code_dim": AT_LEAST_1,
        "commitment": NON_NEGATIVE, "architecture": Range(choices=("medsight", "authors")),
    },
    s.LLMConfig: {
        "backbone": Range(choices=("qwen3", "qwen2", "auto")), "weights_path": ANY_TEXT,
        "prompt_format": Range(choices=("medsight", "chat_template")), "image_token": ANY_TEXT,
        "system_prompt": ANY_TEXT,
        "hidden_size": AT_LEAST_1, "num_layers": AT_LEAST_1, "num_heads": AT_LEAST_1, "num_kv_heads": AT_LEAST_1,
        "intermediate_size": AT_LEAST_1, "max_position_embeddings": Range(ge=16),
        "tokenizer_vocab_size": Range(ge=64),
    },
    s.ModelConfig: {"grounding": Range(choices=("codebook", "seg_token")), "patch_merge": AT_LEAST_1,
                    "t2v_activation": Range(choices=("gelu", "relu"))},
    s.DeepSpeedConfig: {"zero_stage": Range(ge=0, le=3), "gradient_accumulation_steps": AT_LEAST_1},
    s.TrainConfig: {
        "epochs": POSITIVE, "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "batch_size": AT_LEAST_1,
        "warmup_ratio": FRACTION, "grad_clip": NON_NEGATIVE, "seed": NON_NEGATIVE,
        "checkpoint_every": AT_LEAST_1, "log_every": AT_LEAST_1, "num_workers": NON_NEGATIVE,
        "max_steps": NON_NEGATIVE,
    },
    s.PerceiverPretrainConfig: {"max_masks_per_image": AT_LEAST_1, "feature_cache_mb": NON_NEGATIVE},
    s.CodebookPretrainConfig: {"max_masks_per_image": AT_LEAST_1, "feature_cache_mb": NON_NEGATIVE,
                               "init_images": AT_LEAST_1},
    s.InstructTuneConfig: {"lora_rank": NON_NEGATIVE, "lora_alpha": POSITIVE, "lora_dropout": FRACTION,
                           "lora_targets": ANY_TEXT},
    s.LanguageTrainConfig: {"visual_cache_mb": NON_NEGATIVE},
    s.GroundingDataConfig: {
        "generator": Range(choices=("template", "llm")), "seed": NON_NEGATIVE,
        "t2v_samples": AT_LEAST_1, "instruct_images": AT_LEAST_1, "eval_images": AT_LEAST_1,
    },
    s.EvaluateConfig: {
        "batch_size": AT_LEAST_1, "max_new_tokens": AT_LEAST_1, "temperature": NON_NEGATIVE,
        "repetition_penalty": POSITIVE, "report_samples": NON_NEGATIVE,
        "protocol": Range(choices=("strict", "llava-med")),
    },
    s.DataConfig: {
        "source": Range(choices=("synthetic", "biomedparse")), "image_size": AT_LEAST_1,
        "train_images": AT_LEAST_1, "val_images": AT_LEAST_1, "test_images": AT_LEAST_1,
        "seed": NON_NEGATIVE, "taxonomy": ANY_TEXT, "too_many_masks": Range(choices=("error", "skip")),
        "max_bad_fraction": FRACTION,
    },
    s.RegisterConfig: {"thresholds": ANY_TEXT, "model_name": ANY_TEXT, "alias": ANY_TEXT},
    s.ExperimentConfig: {"preset": ANY_TEXT},
}


def range_of(cls: type, name: str) -> Range | None:
    """The declared range of field ``name`` of ``cls``, looked up along its base classes."""
    for klass in cls.__mro__:
        declared = RANGES.get(klass, {})
        if name in declared:
            return declared[name]
    return None


def _leaves(config: Any, prefix: str = "") -> Iterator[tuple[str, type, str, Any]]:
    """(dotted key, owning class, field name, value) of every non-section field."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _leaves(value, key + ".")
        else:
            yield key, type(config), field.name, value


def _relations(c: s.ExperimentConfig) -> list[tuple[bool, str]]:
    """(holds, message) per cross-field rule; each message names the keys involved."""
    e, p, llm = c.model.encoder, c.model.perceiver, c.model.llm
    return [
        (e.image_size % e.patch_size == 0,
         f"model.encoder.image_size={e.image_size} must be a multiple of model.encoder.patch_size={e.patch_size}"),
        (e.width % e.heads == 0,
         f"model.encoder.width={e.width} must be divisible by model.encoder.heads={e.heads}"),
        (p.dim % p.num_heads == 0,
         f"model.perceiver.dim={p.dim} must be divisible by model.perceiver.num_heads={p.num_heads}"),
        (len(p.upsample_factors) == p.num_layers,
         f"model.perceiver.upsample_factors has {len(p.upsample_factors)} entries; "
         f"model.perceiver.num_layers={p.num_layers} needs one per layer"),
        (llm.hidden_size % llm.num_heads == 0,
         f"model.llm.hidden_size={llm.hidden_size} must be divisible by model.llm.num_heads={llm.num_heads}"),
        (llm.num_heads % llm.num_kv_heads == 0,
         f"model.llm.num_heads={llm.num_heads} must be divisible by model.llm.num_kv_heads={llm.num_kv_heads}"),
        (e.patch_size > e.image_size or (e.image_size // e.patch_size) % c.model.patch_merge == 0,
         f"model.patch_merge={c.model.patch_merge} must divide the patch grid "
         f"(model.encoder.image_size / patch_size = {e.image_size // max(1, e.patch_size)})"),
    ]


def range_errors(config: s.ExperimentConfig) -> list[str]:
    """Every out-of-range value and broken relation, one message each (empty when valid)."""
    errors = []
    for key, owner, name, value in _leaves(config):
        declared = range_of(owner, name)
        if declared is None:
            continue
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if not declared.accepts(item):
                shown = list(value) if isinstance(value, tuple) else value
                errors.append(f"{key}={shown!r} is out of range: must be {declared.describe()}")
                break
    if not errors:  # relations assume each value is in range (no division by zero)
        errors += [message for holds, message in _relations(config) if not holds]
    return errors


def check_ranges(config: s.ExperimentConfig, error: Callable[[str], Exception]) -> None:
    """Raise ``error(message)`` for the first invalid value (the message names the key)."""
    errors = range_errors(config)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise error(errors[0] + more)
