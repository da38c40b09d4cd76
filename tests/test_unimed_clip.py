"""UniMed-CLIP's official release loads: the ViT-L/14-336 vision tower is taken out of the combined
checkpoint (full width, reduced depth here), the BiomedBERT text tower is ignored and reported."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import BertConfig, BertModel

from medsight.config import get_preset
from medsight.model.checkpoint_files import CheckpointError
from medsight.model.encoder import ImageEncoder


def reduced_depth_config():
    """The full preset's encoder (1024 wide, 16 heads, 14-px patches at 336, projection 768), 2 blocks."""
    return dataclasses.replace(get_preset("full").model.encoder, model_name="medsight-test-vit-l14-336-2blocks", layers=2, weights_path=None)


def unimed_checkpoint(path, config):
    """Layout of UniMed-CLIP's src/training/main.py save_checkpoint: a DDP CLIP's state dict
    (module.visual.*, module.text_encoder.* = BiomedBERT + MLP projection, module.logit_scale)
    beside the epoch, run name and optimizer state."""
    torch.manual_seed(0)
    visual = ImageEncoder.random_init(config).visual.state_dict()
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37), add_pooling_layer=False)
    state = {f"module.visual.{k}": v.clone() for k, v in visual.items()}
    state.update({f"module.text_encoder.transformer.{k}": v for k, v in bert.state_dict().items()})
    state.update({"module.text_encoder.proj.0.weight": torch.randn(40, 32), "module.text_encoder.proj.2.weight": torch.randn(768, 40),
                  "module.logit_scale": torch.tensor(4.6)})
    torch.save({"epoch": 10, "name": "unimed_clip_vit_l14_base_text_encoder", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": []}]}}, path)
    return visual, len(bert.state_dict())


def test_unimed_release_loads_the_vision_tower_and_reports_the_rest(tmp_path):
    config = reduced_depth_config()
    visual, bert_tensors = unimed_checkpoint(tmp_path / "unimed_clip_vit_l14_base_text_encoder.pt", config)
    encoder = ImageEncoder.from_open_clip_weights(config, tmp_path / "unimed_clip_vit_l14_base_text_encoder.pt")
    loaded = encoder.visual.state_dict()
    assert set(loaded) == set(visual) and all(torch.equal(loaded[k], visual[k]) for k in visual)
    assert loaded["positional_embedding"].shape == (577, 1024) and loaded["proj"].shape == (1024, 768)
    report = encoder.load_report
    assert report.loaded == len(visual)
    assert report.ignored == {"text_encoder": bert_tensors + 2, "logit_scale": 1}
    assert "ignored logit_scale.* (1 tensors), text_encoder.*" in report.summary()
    out = encoder(torch.rand(1, 3, 336, 336))
    assert out.patch_tokens.shape == (1, 576, 1024)


def test_a_file_without_a_vision_tower_is_refused(tmp_path):
    torch.save({"state_dict": {"module.text_encoder.proj.0.weight": torch.zeros(2, 2)}}, tmp_path / "text_only.pt")
    with pytest.raises(CheckpointError, match=r"text_only\.pt: no vision tower found"):
        ImageEncoder.from_open_clip_weights(reduced_depth_config(), tmp_path / "text_only.pt")


def test_a_vision_tower_of_another_width_names_the_config(tmp_path):
    config = reduced_depth_config()
    unimed_checkpoint(tmp_path / "w.pt", config)
    narrow = dataclasses.replace(config, model_name="medsight-test-vit-narrow", width=512, heads=8)
    with pytest.raises(ValueError, match=r"w\.pt: the vision tower does not fit model\.encoder"):
        ImageEncoder.from_open_clip_weights(narrow, tmp_path / "w.pt")
