"""Region Perceiver: shapes, masked attention, one-way vs two-way, positional encoding, overfitting."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from medsight.config.presets import full
from medsight.config.schema import LossConfig, PerceiverConfig
from medsight.model.criterion import SetCriterion
from medsight.model.perceiver_layer import RegionToImageLayer, masked_attention_mask
from medsight.model.position_encoding import SinePositionEncoding2D
from medsight.model.perceiver_factory import build_perceiver
from medsight.model.region_perceiver import RegionPerceiver
from medsight.model.upsample_adapter import UpsampleAdapter


def small_config(**overrides: object) -> PerceiverConfig:
    base = PerceiverConfig(num_queries=6, dim=32, num_layers=2, upsample_factors=(2, 2), num_heads=4, ffn_dim=64, num_classes=3)
    return dataclasses.replace(base, **overrides)


def test_tiny_preset_output_shapes_and_heads_reuse() -> None:
    torch.manual_seed(0)
    config = PerceiverConfig()  # tiny defaults: d=64, 3 layers, 20 queries
    perceiver = RegionPerceiver(64, config)
    out = perceiver(torch.randn(2, 64, 64))  # grid 8x8
    q, c = config.num_queries, config.num_classes + 1
    assert out.queries.shape == (2, q, 64)
    assert out.mask_logits.shape == (2, q, 64, 64)
    assert out.class_logits.shape == (2, q, c)
    assert out.pixel_features.shape == (2, 64, 64, 64)
    assert [tuple(m.shape[-2:]) for m, _ in out.aux] == [(8, 8), (16, 16), (32, 32)]
    assert all(cls.shape == (2, q, c) for _, cls in out.aux)
    # The public decoders reproduce the head outputs from the returned region tokens.
    torch.testing.assert_close(perceiver.decode_masks(out.queries, out.pixel_features), out.mask_logits)
    torch.testing.assert_close(perceiver.classify(out.queries), out.class_logits)


def test_medsight_perceiver_at_paper_scale_output_shapes() -> None:
    """The project's own perceiver stays available at full scale by name (the full preset uses
    the authors' architecture; see tests/test_authors_checkpoints.py)."""
    torch.manual_seed(0)
    experiment = full()
    config = dataclasses.replace(experiment.model.perceiver, architecture="medsight", dim=256, head_dim=0, ffn_dim=1024)
    perceiver = RegionPerceiver(experiment.model.encoder.width, config)
    grid = experiment.model.encoder.grid_size  # 24
    with torch.no_grad():
        out = perceiver(torch.randn(1, grid * grid, experiment.model.encoder.width))
    assert out.queries.shape == (1, config.num_queries, 256)
    assert out.mask_logits.shape == (1, config.num_queries, 192, 192)
    assert out.pixel_features.shape == (1, 256, 192, 192)
    assert out.class_logits.shape == (1, config.num_queries, config.num_classes + 1)
    assert torch.isfinite(out.mask_logits).all()


def test_non_square_patch_grid_is_rejected() -> None:
    perceiver = RegionPerceiver(16, small_config())
    with pytest.raises(ValueError, match="square"):
        perceiver(torch.randn(1, 15, 16))


def test_attention_mask_thresholds_resizes_and_unmasks_empty_rows() -> None:
    logits = torch.full((1, 2, 2, 2), -5.0)  # query 0: empty mask everywhere
    logits[0, 1, 0, 0] = 5.0  # query 1: only the top-left coarse cell
    attend = masked_attention_mask(logits, (4, 4), threshold=0.5)  # [1, 2, 16]
    assert attend[0, 0].all(), "a query with an empty mask must attend everywhere"
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True  # the top-left coarse cell covers the top-left 2x2 fine pixels
    assert torch.equal(attend[0, 1].view(4, 4), expected)


def test_masked_cross_attention_ignores_pixels_outside_the_mask() -> None:
    torch.manual_seed(0)
    dim, pixels_count = 16, 12
    layer = RegionToImageLayer(dim, num_heads=4, ffn_dim=32).eval()
    queries = torch.randn(1, 2, dim)
    query_pos = torch.randn(1, 2, dim)
    pixels = torch.randn(1, pixels_count, dim)
    pixel_pos = torch.randn(1, pixels_count, dim)
    mask_logits = torch.full((1, 2, 3, 4), -3.0)
    mask_logits[0, 1, 0, :2] = 3.0  # query 1 sees pixels 0 and 1 only; query 0's mask is empty
    attend = masked_attention_mask(mask_logits, (3, 4), threshold=0.5)
    before = layer(queries, query_pos, pixels, pixel_pos, attend)

    outside = pixels.clone()
    outside[0, 2:] += torch.randn(pixels_count - 2, dim)
    after_outside = layer(queries, query_pos, outside, pixel_pos, attend)
    torch.testing.assert_close(after_outside[0, 1], before[0, 1])
    # The unmasked (empty-mask) query sees the whole map, so it does change, and stays finite.
    assert not torch.allclose(after_outside[0, 0], before[0, 0])
    assert torch.isfinite(after_outside).all()

    inside = pixels.clone()
    inside[0, 1] += 1.0
    after_inside = layer(queries, query_pos, inside, pixel_pos, attend)
    assert not torch.allclose(after_inside[0, 1], before[0, 1])


@pytest.mark.parametrize("two_way", [False, True])
def test_pixel_map_depends_on_queries_only_when_two_way(two_way: bool) -> None:
    torch.manual_seed(0)
    perceiver = RegionPerceiver(16, small_config(two_way=two_way)).eval()
    tokens = torch.randn(1, 16, 16)
    with torch.no_grad():
        before = perceiver(tokens).pixel_features
        perceiver.query_content.add_(torch.randn_like(perceiver.query_content))
        after = perceiver(tokens).pixel_features
    assert before.shape == (1, 32, 16, 16)
    assert torch.allclose(before, after) is (not two_way)
    assert (len(perceiver.image_to_region) > 0) is two_way


def test_sine_position_encoding_and_adapter_shapes() -> None:
    encoding = SinePositionEncoding2D(8)
    code = encoding(torch.zeros(2, 8, 3, 5))
    assert code.shape == (2, 8, 3, 5)
    flat = code[0].flatten(1).t()  # [15, 8]: one code per pixel
    assert torch.cdist(flat, flat).add(torch.eye(15)).min() > 1e-3, "every pixel needs its own code"
    assert code.abs().max() <= 1.0
    with pytest.raises(ValueError):
        SinePositionEncoding2D(6)
    adapter = UpsampleAdapter(8, factor=2)
    assert adapter(torch.randn(2, 8, 3, 5)).shape == (2, 8, 6, 10)


def _square_mask(size: int, top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[top : top + side, left : left + side] = 1.0
    return mask


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Toy-sized tensors gain nothing from threads, and on a busy 2-core machine the
    OpenMP barriers of a second thread make this loop several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("architecture", ["medsight", "authors"])
def test_perceiver_and_criterion_overfit_a_toy_batch(single_thread: None, architecture: str) -> None:
    torch.manual_seed(0)
    # The authors' layout has no input projection: its width is the encoder's (16 here).
    extra = {"dim": 16, "head_dim": 4, "num_heads": 2} if architecture == "authors" else {}
    config = small_config(architecture=architecture, **extra)
    perceiver = build_perceiver(16, config)  # grid 4 -> masks at 16x16
    criterion = SetCriterion(config.num_classes, LossConfig())
    tokens = torch.randn(2, 16, 16)
    target_masks = [
        torch.stack([_square_mask(16, 0, 0, 8), _square_mask(16, 8, 6, 6)]),
        torch.stack([_square_mask(16, 4, 4, 8)]),
    ]
    target_labels = [torch.tensor([0, 2]), torch.tensor([1])]
    optimizer = torch.optim.AdamW(perceiver.parameters(), lr=2e-3)
    losses = []
    for _ in range(50):
        loss = criterion(perceiver(tokens), target_masks, target_labels).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
