"""Typed configs: presets, dotted overrides, bad keys/types, round trip, DeepSpeed validation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medsight.config import ConfigError, apply_overrides, get_preset, load_config, save_config, to_dict
from medsight.config.schema import ExperimentConfig
from medsight.train.engine import deepspeed_config


def test_presets_share_code_and_differ_in_numbers():
    tiny, full = get_preset("tiny"), get_preset("full")
    assert type(tiny) is type(full) is ExperimentConfig
    assert full.model.encoder.model_name == "ViT-L-14-336-quickgelu"
    assert full.model.encoder.num_patches == 576 and full.model.encoder.width == 1024
    assert full.model.perceiver.num_queries == 20 and full.model.perceiver.num_layers == 3
    # Modality and class counts come from the prepared release (0 = from the data; 18 with biomedparse-18).
    assert (full.model.codebook.num_modalities, full.model.codebook.codes_per_modality, full.model.codebook.code_dim) == (0, 32, 64)
    assert full.model.perceiver.num_classes == 0
    assert full.model.loss.bce_weight == full.model.loss.dice_weight == 5.0
    assert full.model.llm.hidden_size == 4096 and full.model.llm.backbone == "qwen3"
    assert get_preset("full-qwen2.5").model.llm.backbone == "qwen2"
    assert (full.t2v_align.lr, full.instruct_tune.lr, full.perceiver_pretrain.epochs) == (5e-4, 2e-5, 20)


def test_authors_loss_weights_are_reachable():
    config = apply_overrides(get_preset("full"), ["model.loss.bce_weight=1.0", "model.loss.dice_weight=1"])
    assert config.model.loss.bce_weight == 1.0 and config.model.loss.dice_weight == 1.0


def test_overrides_parse_types():
    config = apply_overrides(get_preset("tiny"), ["model.perceiver.two_way=false", "v2t_align.lr=3e-4", "model.llm.weights_path=/w"])
    assert config.model.perceiver.two_way is False and config.v2t_align.lr == 3e-4 and config.model.llm.weights_path == "/w"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.perceiver.num_querys=20", "unknown config key model.perceiver.num_querys"),
        ("model.perceiver.num_queries=twenty", "model.perceiver.num_queries: expected an integer"),
        ("model.perceiver.two_way=maybe", "model.perceiver.two_way: expected true/false"),
        ("nokey", "must look like key.path=value"),
        ("bogus.section.x=1", "unknown config key bogus"),
    ],
)
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        apply_overrides(get_preset("tiny"), [override])


def test_round_trip_and_bad_file(tmp_path):
    config = apply_overrides(get_preset("full"), ["model.codebook.codes_per_modality=64"])
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert to_dict(load_config(path)) == to_dict(config)
    path.write_text(path.read_text().replace("codes_per_modality: 64", "codes_per_modality: 6.5"))
    with pytest.raises(ConfigError, match=r"config.yaml: model.codebook.codes_per_modality: expected an integer"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_bad_key_with_nonzero_exit(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "medsight.cli", "stage", "run", "perceiver-pretrain", "--out", str(tmp_path / "o"),
         "--set", "perceiver_pretrain.epoch=3"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "unknown config key perceiver_pretrain.epoch" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage", ["v2t_align", "t2v_align", "instruct_tune"])
def test_full_preset_deepspeed_configs_validate(stage):
    """ZeRO-3 + bf16 for the full preset, checked by DeepSpeed's own config parser (no engine)."""
    code = f"""
import json
from deepspeed.runtime.config import DeepSpeedConfig
from medsight.config import get_preset
from medsight.train.engine import deepspeed_config
stage = getattr(get_preset('full'), '{stage}')
cfg = DeepSpeedConfig(deepspeed_config(stage, stage.deepspeed, world_size=1))
print(json.dumps([cfg.zero_optimization_stage, cfg.bfloat16_config.enabled, cfg.train_batch_size]))
"""
    env = {"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"}
    import os

    env.update({k: v for k, v in os.environ.items() if k in ("HOME", "PYTHONPATH", "VIRTUAL_ENV")})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    zero, bf16, batch = json.loads(out.stdout.strip().splitlines()[-1])
    stage_config = getattr(get_preset("full"), stage)
    # DeepSpeed's train_batch_size: micro-batch x accumulation x ranks (one here).
    assert zero == 3 and bf16 is True and batch == stage_config.batch_size * stage_config.deepspeed.gradient_accumulation_steps
    assert get_preset("full").model.llm.gradient_checkpointing is True


def test_deepspeed_config_rejects_batch_mismatch():
    code = """
from deepspeed.runtime.config import DeepSpeedConfig
from medsight.config import get_preset
from medsight.train.engine import deepspeed_config
s = get_preset('full').instruct_tune
c = deepspeed_config(s, s.deepspeed, world_size=1)
c['train_batch_size'] = 7
DeepSpeedConfig(c)
"""
    import os

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode != 0 and "train_batch_size" in out.stderr
