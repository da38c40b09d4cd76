"""The full preset builds with the same code (shapes and parameter counts; no weights needed)."""

from __future__ import annotations

import pytest
import torch

from medsight.config import get_preset
from medsight.data.taxonomy import check_model_matches
from medsight.data.taxonomy_template import TaxonomyTemplate
from medsight.model.encoder import ImageEncoder
from medsight.model.llm import random_init_llm
from medsight.model.projectors import TextToVisionProjector, VisionToTextProjector
from medsight.model.perceiver_factory import build_codebook, build_perceiver


def test_full_encoder_gives_576_patch_tokens_of_width_1024():
    config = get_preset("full").model.encoder
    encoder = ImageEncoder.random_init(config)
    out = encoder(torch.rand(1, 3, 336, 336))
    assert out.patch_tokens.shape == (1, 576, 1024) and out.cls_token.shape == (1, 1024)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_full_perceiver_codebook_projectors_shapes():
    """The authors' widths; the map is run on a 6x6 grid (x8 per axis, as 24 -> 192 at 336 px),
    since the 192x192 pass takes a minute on a CPU (bench/bench_perceiver.py times it)."""
    config = get_preset("full")
    # The counts come from the prepared release: the biomedparse-18 template with 17 collected classes.
    release = TaxonomyTemplate.load("biomedparse-18").complete([f"class {i}" for i in range(17)], "release")
    check_model_matches(config, release)
    model = config.model
    assert (model.perceiver.architecture, model.codebook.architecture) == ("authors", "authors")
    perceiver = build_perceiver(model.encoder.width, model.perceiver)
    with torch.no_grad():
        out = perceiver(torch.randn(1, 36, 1024))
    assert out.queries.shape == (1, 20, 1024)
    assert out.pixel_features.shape == (1, 1024, 48, 48)  # 6 -> 12 -> 24 -> 48
    assert out.class_logits.shape == (1, 20, 18)  # 17 classes + no-object
    codebook = build_codebook(model.perceiver.dim, model.codebook, model.encoder.width, model.perceiver.num_classes)
    assert codebook.all_code_queries().shape == (18 * 32, 1024)
    v2t = VisionToTextProjector(model.encoder.width, model.perceiver.dim, model.llm.hidden_size)
    assert isinstance(v2t.region_lift, torch.nn.Identity)  # d = C: patches and regions share one MLP input
    visual = v2t(torch.randn(1, 576, 1024), out.queries)
    assert visual.shape == (1, 596, 4096)
    t2v = TextToVisionProjector(model.llm.hidden_size, model.perceiver.dim, model.t2v_activation)
    assert isinstance(t2v.mlp[1], torch.nn.ReLU) and t2v(torch.randn(2, 4096)).shape == (2, 1024)


@pytest.mark.parametrize("preset, billions", [("full", 8.2), ("full-qwen2.5", 7.6)])
def test_full_llm_configs_have_paper_scale(preset, billions):
    llm_config = get_preset(preset).model.llm
    vocab = 151_936 if llm_config.backbone == "qwen3" else 152_064
    with torch.device("meta"):
        llm = random_init_llm(llm_config, vocab_size=vocab)
    count = sum(p.numel() for p in llm.parameters()) / 1e9
    assert abs(count - billions) < 0.3, count


def test_full_preset_requires_local_weights(tmp_path):
    from medsight.stages.base_models import run

    config = get_preset("full")
    config.model.encoder.weights_path = str(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        run(config, {"data": tmp_path}, tmp_path / "out", tracker=None)
