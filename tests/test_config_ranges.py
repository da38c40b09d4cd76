"""Issue 9, item 5: every config field has its valid range, checked at load and on --set."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from medsight.config import ConfigError, apply_overrides, get_preset, load_config, to_dict
from medsight.config.presets import PRESETS
from medsight.config.ranges import range_errors, range_of
from medsight.config.schema import ExperimentConfig


def _fields(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            yield from _fields(kind, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", cls, field.name, kind


def test_every_field_declares_its_range():
    undeclared = [key for key, owner, name, kind in _fields(ExperimentConfig)
                  if kind is not bool and range_of(owner, name) is None]
    assert undeclared == []


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_in_range(preset):
    assert range_errors(get_preset(preset)) == []


@pytest.mark.parametrize("override,key", [
    ("perceiver_pretrain.lr=0", "perceiver_pretrain.lr"),
    ("instruct_tune.epochs=0", "instruct_tune.epochs"),
    ("codebook_pretrain.epochs=-5", "codebook_pretrain.epochs"),
    ("t2v_align.batch_size=0", "t2v_align.batch_size"),
    ("perceiver_pretrain.batch_size=-4", "perceiver_pretrain.batch_size"),
    ("v2t_align.checkpoint_every=0", "v2t_align.checkpoint_every"),
    ("perceiver_pretrain.log_every=0", "perceiver_pretrain.log_every"),
    ("perceiver_pretrain.warmup_ratio=1.5", "perceiver_pretrain.warmup_ratio"),
    ("perceiver_pretrain.lr=nan", "perceiver_pretrain.lr"),
    ("model.perceiver.dropout=1", "model.perceiver.dropout"),
    ("model.encoder.std=[0.2,0,0.2]", "model.encoder.std"),
    ("model.llm.backbone=llama", "model.llm.backbone"),
    ("data.too_many_masks=truncate", "data.too_many_masks"),
    ("evaluate.max_new_tokens=0", "evaluate.max_new_tokens"),
    ("instruct_tune.deepspeed.zero_stage=4", "instruct_tune.deepspeed.zero_stage"),
])
def test_out_of_range_values_are_refused_naming_the_key_and_range(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is out of range: must be "):
        apply_overrides(get_preset("tiny"), [override])


def test_relations_between_fields_name_both_keys():
    with pytest.raises(ConfigError, match="model.encoder.image_size=60 must be a multiple of model.encoder.patch_size=8"):
        apply_overrides(get_preset("tiny"), ["model.encoder.patch_size=8", "model.encoder.image_size=60"])
    with pytest.raises(ConfigError, match="model.perceiver.upsample_factors has 3 entries"):
        apply_overrides(get_preset("tiny"), ["model.perceiver.num_layers=2"])


def test_a_config_file_out_of_range_is_refused_naming_file_and_key(tmp_path: Path):
    data = to_dict(get_preset("tiny"))
    data["perceiver_pretrain"]["checkpoint_every"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"^{path}: perceiver_pretrain.checkpoint_every=0 is out of range: must be >= 1"):
        load_config(path)
