"""The authors' released checkpoints load strictly into the ``authors`` variants and compute what
their model computes: perceiver (parity to 1e-5 with a reference written from the equations),
codebook, stage-3 projector; pickles are read with weights_only and anything else is refused."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from medsight.config import get_preset
from medsight.importers.authors_keys import codebook_state, perceiver_state, PROJECTOR_RULES, apply_rules
from medsight.model.authors_layers import NormedCrossAttention
from medsight.model.checkpoint_files import CheckpointError, load_checkpoint_file
from medsight.model.perceiver_factory import build_codebook, build_perceiver
from medsight.model.projectors import VisionToTextProjector
from tests.authors_fakes import FULL, codebook_key_shapes, perceiver_key_shapes, projector_key_shapes, random_state

# --------------------------------------------------------------------------- the reference
# Written from the equations of the released model (see medsight/model/authors_layers.py for them),
# directly on the authors' key names, in float64, with the blocked logits filled with -1e9 as the
# paper's masked attention prescribes. Deliberately naive: explicit heads, einsum, softmax.


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)


def _attend(sd, name, reader, context, heads, blocked=None):
    q = _ln(reader, sd, f"{name}.norm_latents") @ sd[f"{name}.to_q.weight"].T
    k, v = (_ln(context, sd, f"{name}.norm_media") @ sd[f"{name}.to_kv.weight"].T).chunk(2, dim=-1)
    split = lambda t: t.reshape(*t.shape[:2], heads, -1).permute(0, 2, 1, 3)  # noqa: E731  [B, h, L, dh]
    q, k, v = split(q), split(k), split(v)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    if blocked is not None:
        logits = logits.masked_fill(blocked[:, None], -1e9)
    out = torch.einsum("bhij,bhjd->bhid", logits.softmax(-1), v)
    return out.permute(0, 2, 1, 3).reshape(*reader.shape[:2], -1) @ sd[f"{name}.to_out.weight"].T


def _ffn(sd, name, x):
    return F.gelu(_ln(x, sd, f"{name}.0") @ sd[f"{name}.1.weight"].T) @ sd[f"{name}.3.weight"].T


def _positions(h, w, d):
    """y_i = i / (h + 1e-6) * 2 pi (i = 1..h), same for x; channel pair (2j, 2j+1) = (sin, cos) of
    coordinate / 10000^(2j / (d/2)); y channels first."""
    half = d // 2

    def axis(n):
        coords = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1e-6) * 2 * math.pi
        out = torch.empty(n, half, dtype=torch.float64)
        for c in range(half):
            angle = coords / 10000 ** (2 * (c // 2) / half)
            out[:, c] = torch.sin(angle) if c % 2 == 0 else torch.cos(angle)
        return out

    return torch.cat([axis(h)[:, None, :].expand(h, w, half), axis(w)[None, :, :].expand(h, w, half)], dim=-1).reshape(h * w, d)


def _head(sd, queries, pixels):
    masks = torch.einsum("bqd,bpd->bqp", queries @ sd["segmentation_cls_head.proj.weight"].T + sd["segmentation_cls_head.proj.bias"], pixels)
    return masks, queries @ sd["segmentation_cls_head.class_embed.weight"].T + sd["segmentation_cls_head.class_embed.bias"]


def reference_forward(sd, tokens, heads, layers, stats):
    """The released layer order (P L796-875) -> (final queries, mask logits [B, Q, H, W], classes)."""
    b, n, d = tokens.shape
    h = w = int(math.isqrt(n))
    pixels = tokens + _positions(h, w, d)
    queries = sd["region_queries"].expand(b, -1, -1)
    queries = _ln(_attend(sd, "init_cross_attn", queries, pixels, heads) + queries, sd, "init_cross_norm")
    queries = _ln(_ffn(sd, "init_ff", queries) + queries, sd, "init_ff_norm")
    masks, classes = _head(sd, queries, pixels)
    for i in range(layers):
        grid = pixels.reshape(b, h, w, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=2, mode="bilinear", align_corners=False)
        grid = F.conv2d(grid, sd[f"conv_adapters.{i}.conv.weight"], sd[f"conv_adapters.{i}.conv.bias"], padding=1)
        blocked = F.interpolate(masks.reshape(b, -1, h, w), size=(2 * h, 2 * w), mode="bilinear", align_corners=False).sigmoid() < 0.5
        h, w = 2 * h, 2 * w
        blocked = blocked.reshape(b, -1, h * w)
        stats.append(blocked.float().mean(-1))
        pixels = grid.permute(0, 2, 3, 1).reshape(b, h * w, d) + _positions(h, w, d)
        block = f"bi_blocks.{i}"
        queries = _ln(_attend(sd, f"{block}.region_to_image", queries, pixels, heads, blocked) + queries, sd, f"{block}.region_to_image_norm")
        queries = _ln(_ffn(sd, f"{block}.ff_region", queries) + queries, sd, f"{block}.ff_region_norm")
        pixels = _ln(_attend(sd, f"{block}.image_to_region", pixels, queries, heads) + pixels, sd, f"{block}.image_to_region_norm")
        pixels = _ln(_ffn(sd, f"{block}.ff_image", pixels) + pixels, sd, f"{block}.ff_image_norm")
        masks, classes = _head(sd, queries, pixels)
    return queries, masks.reshape(b, -1, h, w), classes


# --------------------------------------------------------------------------- tests


def _full_perceiver_config():
    config = get_preset("full").model
    # The preset takes both counts from the dataset's taxonomy; the release has 17 classes, 18 modalities.
    config.perceiver.num_classes, config.codebook.num_modalities = FULL["classes"], FULL["modalities"]
    return config


def test_full_size_perceiver_loads_strictly_and_matches_the_reference():
    shapes = perceiver_key_shapes(**FULL)
    authors = random_state(shapes, seed=1, dtype=torch.float64)
    converted = perceiver_state(authors, "fabricated stage-1 checkpoint")
    config = _full_perceiver_config()
    perceiver = build_perceiver(config.encoder.width, config.perceiver).double()
    missing, unexpected = perceiver.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    # Every source tensor was used exactly once and kept its values.
    assert len(converted) == len(authors) == len(perceiver.state_dict())
    assert sum(v.numel() for v in authors.values()) == sum(p.numel() for p in perceiver.parameters())

    # Full widths; a 3x3 grid (-> 24x24) keeps the float64 pass to seconds (the 24 -> 192 shapes
    # are timed in bench/bench_perceiver.py).
    tokens = torch.randn(2, 9, FULL["dim"], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    stats: list[torch.Tensor] = []
    with torch.no_grad():
        ref_queries, ref_masks, ref_classes = reference_forward(authors, tokens, FULL["heads"], FULL["layers"], stats)
        out = perceiver(tokens)
    torch.testing.assert_close(out.mask_logits, ref_masks, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.class_logits, ref_classes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.queries, ref_queries, rtol=1e-5, atol=1e-5)
    assert out.mask_logits.shape == (2, 20, 24, 24) and out.class_logits.shape == (2, 20, 18)
    # The masks really gate attention: some pixels blocked, not all (else the test is vacuous).
    blocked = torch.cat([s.flatten() for s in stats])
    assert 0.0 < float(blocked.mean()) < 1.0
    # LLM-token decoding re-runs the perceiver with the given queries as the initial ones.
    with torch.no_grad():
        again = perceiver.decode_llm_queries(authors["region_queries"].expand(2, -1, -1), tokens, out.pixel_features)
    torch.testing.assert_close(again, out.mask_logits)


def test_a_fully_blocked_query_averages_every_value_as_the_release_does():
    torch.manual_seed(0)
    attention = NormedCrossAttention(16, heads=2, head_dim=4).double()
    names = {"reader_norm": "norm_latents", "context_norm": "norm_media"}
    sd = {}
    for key, value in attention.state_dict().items():
        module, param = key.split(".")
        sd[f"a.{names.get(module, module)}.{param}"] = value
    reader, context = torch.randn(1, 3, 16, dtype=torch.float64), torch.randn(1, 5, 16, dtype=torch.float64)
    blocked = torch.zeros(1, 3, 5, dtype=torch.bool)
    blocked[0, 0] = True  # query 0 may read nothing
    blocked[0, 1, :2] = True
    expected = _attend(sd, "a", reader, context, 2, blocked)
    torch.testing.assert_close(attention(reader, context, blocked), expected)


def test_full_size_codebook_loads_strictly_and_quantizes_as_the_release():
    shapes = codebook_key_shapes(**FULL)
    authors = random_state(shapes, seed=3)
    mapped = codebook_state(authors, "fabricated stage-2 checkpoint")
    config = _full_perceiver_config()
    codebook = build_codebook(config.perceiver.dim, config.codebook, config.encoder.width, config.perceiver.num_classes)
    missing, unexpected = codebook.load_state_dict(mapped.state, strict=True)
    assert not missing and not unexpected and not mapped.ignored
    assert sum(v.numel() for v in authors.values()) == sum(p.numel() for p in codebook.parameters())

    # Their rule: z = to_code(q); nearest L2-normalised code of the image's modality to the
    # L2-normalised z; the decoder reads that normalised code.
    queries = torch.randn(2, 20, 1024)
    modality = torch.tensor([4, 17])

    def seq(prefix, x, layers):
        for index in layers:
            key = f"{prefix}.{index}"
            if index in (0, 3):
                x = F.gelu(x @ authors[f"{key}.weight"].T + authors[f"{key}.bias"])
            else:
                x = F.layer_norm(x, x.shape[-1:], authors[f"{key}.weight"], authors[f"{key}.bias"])
        return x

    z = seq("region_perceiver.to_code", queries, (0, 2, 3, 5))
    expected_index, expected_quantized = [], []
    for b, m in enumerate(modality.tolist()):
        codes = F.normalize(authors[f"quantizer.codebooks.{m}.embedding.weight"], dim=-1)
        index = torch.cdist(F.normalize(z[b], dim=-1), codes).argmin(-1)
        expected_index.append(index)
        expected_quantized.append(seq("region_perceiver.code_decoder.from_code", codes[index], (0, 2, 3, 5)))
    with torch.no_grad():
        out = codebook(queries, modality)
    assert torch.equal(out.indices, torch.stack(expected_index))
    torch.testing.assert_close(out.quantized, torch.stack(expected_quantized), rtol=1e-5, atol=1e-5)
    cls = torch.randn(2, 1024)
    torch.testing.assert_close(codebook.predict_modality(cls), cls @ authors["modality_predictor.weight"].T + authors["modality_predictor.bias"])


def test_full_size_stage3_projector_loads_strictly():
    authors = random_state(projector_key_shapes(1024, 4096), seed=4)
    v2t = VisionToTextProjector(1024, 1024, 4096)
    mapped = apply_rules(authors, PROJECTOR_RULES, "mm_projector.bin")
    missing, unexpected = v2t.load_state_dict(mapped, strict=True)
    assert not missing and not unexpected
    patches, regions = torch.randn(1, 576, 1024), torch.randn(1, 20, 1024)
    expected = F.gelu(torch.cat([patches, regions], 1) @ authors["model.mm_projector.0.weight"].T + authors["model.mm_projector.0.bias"])
    expected = expected @ authors["model.mm_projector.2.weight"].T + authors["model.mm_projector.2.bias"]
    with torch.no_grad():
        torch.testing.assert_close(v2t(patches, regions), expected, rtol=1e-5, atol=1e-5)


def test_unknown_variant_keys_are_refused_with_the_key_named():
    shapes = perceiver_key_shapes(dim=8, heads=2, head_dim=4, ffn=16, queries=3, layers=1, classes=2)
    state = random_state(shapes)
    state["bi_blocks.0.region_self_attn.to_qkv.weight"] = torch.zeros(24, 8)  # the use_self_attn variant
    with pytest.raises(CheckpointError, match="region_self_attn"):
        perceiver_state(state, "x.pt")


class Payload:
    """Any class beyond plain data: unpickling it could run code, so it must be refused."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_load_with_weights_only_and_unsafe_ones_are_refused(tmp_path, capsys):
    from tests.authors_fakes import save_vq_train_checkpoint

    good = save_vq_train_checkpoint(tmp_path / "0079280.pt", {"region_perceiver.region_queries": torch.zeros(1, 2, 4)})
    loaded = load_checkpoint_file(good)
    assert loaded["steps"] == 79280 and loaded["args"].num_stages == 3  # the argparse Namespace is allowed
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as handle:
        pickle.dump({"model": Payload()}, handle)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused: .*weights_only=True"):
        load_checkpoint_file(bad)
    assert "this must never run" not in capsys.readouterr().out


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs (distinct storages)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_feed_forward_recomputes_gelu_instead_of_keeping_it():
    """Same values and gradients as LN -> W1 -> GELU -> W2, without storing GELU's [L, 4d] output."""
    from medsight.model.authors_layers import NormedFeedForward

    torch.manual_seed(0)
    ffn = NormedFeedForward(16, 64).double()
    x = torch.randn(2, 50, 16, dtype=torch.float64, requires_grad=True)
    plain = lambda: ffn.fc2(F.gelu(ffn.fc1(ffn.norm(x))))  # noqa: E731
    out, ref = ffn(x), plain()
    assert torch.equal(out, ref)
    weights = (x, ffn.fc1.weight, ffn.fc2.weight)
    grads = torch.autograd.grad(out.sum() * 3, weights)
    expected = torch.autograd.grad(ref.sum() * 3, weights)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    gelu_output = 2 * 50 * 64 * 8  # bytes of GELU(h) in float64
    assert _saved_bytes(plain) - _saved_bytes(lambda: ffn(x)) == gelu_output
