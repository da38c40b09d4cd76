"""Modality-aware VQ codebook: straight-through, loss terms, per-modality lookup, dead codes."""

from __future__ import annotations

import pytest
import torch

from medsight.config.schema import CodebookConfig
from medsight.model.codebook import ModalityCodebook

QUERY_DIM, ENCODER_WIDTH = 16, 12


def make_codebook(**overrides: object) -> ModalityCodebook:
    torch.manual_seed(0)
    config = CodebookConfig(num_modalities=3, codes_per_modality=4, code_dim=8, commitment=0.25, **overrides)
    return ModalityCodebook(QUERY_DIM, config, ENCODER_WIDTH)


def test_output_shapes_and_code_queries_order() -> None:
    codebook = make_codebook()
    out = codebook(torch.randn(2, 5, QUERY_DIM), torch.tensor([0, 2]))
    assert out.quantized.shape == (2, 5, QUERY_DIM)
    assert out.codes_z_q.shape == out.z.shape == (2, 5, 8)
    assert out.indices.shape == (2, 5) and out.indices.dtype == torch.long
    assert int(out.indices.max()) < 4
    all_queries = codebook.all_code_queries()
    assert all_queries.shape == (12, QUERY_DIM)
    modality, code = torch.tensor([[2, 1]]), torch.tensor([[3, 0]])
    torch.testing.assert_close(codebook.embed_codes(modality, code)[0], all_queries[[2 * 4 + 3, 1 * 4 + 0]])
    with pytest.raises(ValueError):
        codebook(torch.randn(1, 5, QUERY_DIM), torch.tensor([3]))


def test_nearest_code_is_chosen_within_the_image_modality_only() -> None:
    codebook = make_codebook()
    queries = torch.randn(1, 3, QUERY_DIM)
    with torch.no_grad():
        z = codebook.project_in(queries)
    expected = torch.cdist(z[0], codebook.codes[0].detach()).argmin(dim=-1)  # nearest within modality 0
    planted = (int(expected[0]) + 1) % 4  # a different index, so the two lookups cannot agree by chance
    with torch.no_grad():
        codebook.codes[1, planted] = z[0, 0]  # a perfect match, but in modality 1
    out = codebook(queries, torch.tensor([0]))
    assert torch.equal(out.indices[0], expected)
    torch.testing.assert_close(out.codes_z_q[0], codebook.codes[0, expected].detach())
    in_modality_1 = codebook(queries, torch.tensor([1]))
    assert in_modality_1.indices[0, 0].item() == planted
    torch.testing.assert_close(in_modality_1.codes_z_q[0, 0], z[0, 0])


def test_straight_through_gradient_reaches_projection_unchanged() -> None:
    codebook = make_codebook()
    out = codebook(torch.randn(2, 5, QUERY_DIM), torch.tensor([1, 0]))
    upstream = torch.randn_like(out.quantized)
    grad_z, grad_z_q = torch.autograd.grad((out.quantized * upstream).sum(), [out.z, out.codes_z_q])
    torch.testing.assert_close(grad_z, grad_z_q)  # d z_q / d z = identity
    assert grad_z.abs().sum() > 0

    codebook.zero_grad()
    out = codebook(torch.randn(2, 5, QUERY_DIM), torch.tensor([1, 0]))
    out.quantized.square().sum().backward()
    assert codebook.project_in[0].weight.grad.abs().sum() > 0, "P_q must learn through the quantizer"
    assert codebook.codes.grad is None or codebook.codes.grad.abs().sum() == 0


def test_vq_terms_by_hand_and_their_gradients() -> None:
    codebook = make_codebook()
    queries, modality = torch.randn(2, 5, QUERY_DIM), torch.tensor([2, 2])
    out = codebook(queries, modality)
    chosen = codebook.codes[modality[:, None], out.indices].detach()  # [2, 5, 8]
    z = codebook.project_in(queries).detach()
    commitment_by_hand = 0.25 * ((z - chosen) ** 2).sum() / z.numel()
    codebook_by_hand = ((chosen - z) ** 2).sum() / z.numel()
    assert out.commitment_loss.item() == pytest.approx(commitment_by_hand.item(), rel=1e-5)
    assert out.codebook_loss.item() == pytest.approx(codebook_by_hand.item(), rel=1e-5)
    assert out.vq_loss.item() == pytest.approx((commitment_by_hand + codebook_by_hand).item(), rel=1e-5)
    recon_by_hand = ((out.quantized.detach() - queries) ** 2).mean()
    assert out.recon_loss.item() == pytest.approx(recon_by_hand.item(), rel=1e-5)

    # The codebook term moves only the chosen codes of modality 2, never the projection.
    out.codebook_loss.backward(retain_graph=True)
    grad = codebook.codes.grad
    used = torch.zeros(3, 4, dtype=torch.bool)
    used[2, out.indices.unique()] = True
    assert grad[used].abs().sum() > 0 and grad[~used].abs().sum() == 0
    assert codebook.project_in[0].weight.grad is None
    # The commitment term moves only the projection, never the codes.
    codebook.zero_grad()
    out.commitment_loss.backward()
    assert codebook.codes.grad is None or codebook.codes.grad.abs().sum() == 0
    assert codebook.project_in[0].weight.grad.abs().sum() > 0


def test_modality_predictor() -> None:
    codebook = make_codebook()
    assert codebook.predict_modality(torch.randn(4, ENCODER_WIDTH)).shape == (4, 3)
    without = make_codebook(modality_predictor=False)
    with pytest.raises(RuntimeError):
        without.predict_modality(torch.randn(4, ENCODER_WIDTH))


def clustered_queries(num_images: int, modality: int, generator: torch.Generator) -> torch.Tensor:
    """Queries around four well-separated centres per modality: [num_images, 6, QUERY_DIM]."""
    centres = torch.randn(4, QUERY_DIM, generator=generator) * 3 + modality * 5
    picks = torch.randint(4, (num_images, 6), generator=generator)
    return centres[picks] + 0.05 * torch.randn(num_images, 6, QUERY_DIM, generator=generator)


def test_kmeans_plus_plus_init_uses_several_codes_per_modality() -> None:
    codebook = make_codebook()
    generator = torch.Generator().manual_seed(1)
    queries = torch.cat([clustered_queries(4, 0, generator), clustered_queries(4, 1, generator)])
    modality = torch.tensor([0] * 4 + [1] * 4)
    untouched = codebook.codes[2].detach().clone()
    before = codebook.count_usage(codebook(queries, modality).indices, modality)
    codebook.initialize_codes(queries, modality, generator=generator)
    usage = codebook.count_usage(codebook(queries, modality).indices, modality)
    assert usage.sum() == queries.shape[0] * queries.shape[1]
    assert ((usage[0] > 0).sum() > 1) and ((usage[1] > 0).sum() > 1)
    assert (usage[:2] > 0).sum() > (before[:2] > 0).sum()
    torch.testing.assert_close(codebook.codes[2], untouched)  # absent modality keeps its codes


def test_reseed_moves_only_dead_codes_onto_current_points() -> None:
    codebook = make_codebook()
    z = torch.randn(2, 5, 8)
    modality = torch.tensor([1, 1])
    usage = torch.zeros(3, 4, dtype=torch.long)
    usage[1, 0] = 7  # code (1, 0) is alive; (1, 1..3) are dead; modality 0 and 2 absent
    before = codebook.codes.detach().clone()
    moved = codebook.reseed_dead_codes(z, modality, usage, generator=torch.Generator().manual_seed(0))
    assert moved == 3
    after = codebook.codes.detach()
    torch.testing.assert_close(after[1, 0], before[1, 0])
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[2], before[2])
    distance_to_points = torch.cdist(after[1, 1:], z.reshape(-1, 8)).min(dim=1).values
    assert (distance_to_points < 0.05).all(), "dead codes must land on (near) current z's"
