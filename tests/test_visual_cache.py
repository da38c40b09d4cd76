"""The LLM stages' visual-feature cache: same features as recomputing, bounded, counted."""

from __future__ import annotations

import pytest
import torch

from medsight.model.visual_cache import VisualContextCache


def _features(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return images.mean(dim=(2, 3)), images[:, 0] * 2


def test_lookup_computes_only_new_images_and_returns_batch_order():
    calls = []

    def compute(images):
        calls.append(images.shape[0])
        return _features(images)

    cache = VisualContextCache(max_bytes=1 << 20)
    images = torch.rand(3, 3, 4, 4)
    first = cache.lookup(["a", "b", "c"], images, compute)
    assert calls == [3] and (cache.hits, cache.misses) == (0, 3)
    # Same images in another order plus one new one: only the new one is computed.
    again = torch.cat([images[[2, 0]], torch.rand(1, 3, 4, 4)])
    second = cache.lookup(["c", "a", "d"], again, compute)
    assert calls == [3, 1] and (cache.hits, cache.misses) == (2, 4)
    expected = _features(again)
    for got, want in zip(second, expected):
        assert torch.allclose(got, want)
    assert torch.allclose(second[0][0], first[0][2])


def test_budget_stops_storing_but_answers_stay_correct():
    row_bytes = 3 * 4 + 4 * 4 * 4  # one image's two feature rows in float32
    cache = VisualContextCache(max_bytes=2 * row_bytes)
    images = torch.rand(4, 3, 4, 4)
    out = cache.lookup(list("abcd"), images, _features)
    assert len(cache) == 2 and cache.used_bytes == 2 * row_bytes
    for got, want in zip(out, _features(images)):
        assert torch.allclose(got, want)
    assert VisualContextCache.from_megabytes(0) is None
    with pytest.raises(ValueError, match="budget"):
        VisualContextCache(-1)


def test_model_features_with_cache_equal_recomputed(tiny_model):
    model, _ = tiny_model
    size = model.config.encoder.image_size
    images = torch.rand(2, 3, size, size)
    plain = model.encode_images(images)
    model.visual_cache = VisualContextCache(max_bytes=1 << 24)
    try:
        model.train()  # the frozen vision side must stay in eval mode regardless
        assert not model.perceiver.training and not model.encoder.training
        cached = model.encode_images(images, ["x.png", "y.png"])
        served = model.encode_images(images.flip(0), ["y.png", "x.png"])
    finally:
        model.visual_cache = None
        model.eval()
    for field in ("patch_tokens", "cls_token", "region_queries", "pixel_features"):
        assert torch.allclose(getattr(cached, field), getattr(plain, field), atol=1e-6), field
        assert torch.allclose(getattr(served, field), getattr(plain, field).flip(0), atol=1e-6), field


def test_decoded_files_load_each_path_once_within_budget(tmp_path):
    from PIL import Image

    from medsight.data import image_io
    from medsight.data.conversation_dataset import DecodedFiles

    paths = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        Image.fromarray((torch.rand(8, 8, 3) * 255).byte().numpy()).save(path)
        paths.append(path)
    loads = []

    def load(path, size):
        loads.append(path.name)
        return image_io.load_image(path, size)

    one_image = 3 * 8 * 8 * 4  # float32 [3, 8, 8]
    cache = DecodedFiles(max_bytes=2 * one_image)
    first = [cache.get(p, 8, load) for p in paths]
    again = [cache.get(p, 8, load) for p in paths]
    # Fill-first: the first two fit and are not read again; the third is over budget and is.
    assert loads == ["0.png", "1.png", "2.png", "2.png"] and cache.used_bytes == 2 * one_image
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    cache.get(paths[0], 4, load)  # another size is another entry
    assert loads[-1] == "0.png"
    with pytest.raises(ValueError, match="budget"):
        DecodedFiles(-1)
