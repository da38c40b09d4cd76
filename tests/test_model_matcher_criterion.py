"""Hungarian matcher optimality, hand-computed Dice/BCE, set and ordered mask criteria."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from medsight.config.schema import LossConfig
from medsight.model.criterion import SetCriterion, dice_loss, ordered_mask_loss, sigmoid_bce_loss
from medsight.model.matcher import HungarianMatcher, softplus_sums
from medsight.model.region_perceiver import PerceiverOutput


def hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 2x2 masks whose losses are worked out by hand below."""
    ln3 = math.log(3.0)  # sigmoid(ln 3) = 0.75
    logits = torch.tensor(
        [
            [[0.0, 0.0], [0.0, 0.0]],  # p = 0.5 everywhere
            [[ln3, -ln3], [ln3, -ln3]],  # p = 0.75 / 0.25
        ]
    )
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    return logits, targets


def test_bce_and_dice_match_hand_computed_values() -> None:
    logits, targets = hand_example()
    # Mask 0: every pixel costs -ln 0.5 = 0.6931472.
    # Mask 1: every pixel costs -ln 0.75 = 0.2876821 (t=1, p=.75 or t=0, p=.25).
    # Mean over masks: (0.6931472 + 0.2876821) / 2 = 0.4904146.
    assert sigmoid_bce_loss(logits, targets).item() == pytest.approx(0.4904146, abs=1e-6)
    # Mask 0: sum(pt) = 0.5, sum(p) = 2, sum(t) = 1 -> 1 - (1 + 1) / (2 + 1 + 1) = 0.5.
    # Mask 1: sum(pt) = 1.5, sum(p) = 2, sum(t) = 2 -> 1 - (3 + 1) / (2 + 2 + 1) = 0.2.
    assert dice_loss(logits, targets).item() == pytest.approx(0.35, abs=1e-6)
    assert dice_loss(logits[:1], targets[:1]).item() == pytest.approx(0.5, abs=1e-6)
    assert dice_loss(logits[:0], targets[:0]).item() == 0.0


def test_ordered_mask_loss_weights_and_upsamples_predictions() -> None:
    logits, targets = hand_example()
    config = LossConfig(bce_weight=5.0, dice_weight=5.0)
    # 5 * 0.4904146 + 5 * 0.35 = 4.202073
    assert ordered_mask_loss(logits, targets, config).item() == pytest.approx(4.202073, abs=1e-5)
    # A 1x1 zero logit upsampled to 2x2 is mask 0 of the hand example: 5 * 0.6931472 + 5 * 0.5.
    coarse = torch.zeros(1, 1, 1)
    assert ordered_mask_loss(coarse, targets[:1], config).item() == pytest.approx(5.965736, abs=1e-5)
    with pytest.raises(ValueError):
        ordered_mask_loss(logits, targets[:1], config)


def brute_force_cost(cost: torch.Tensor) -> float:
    """Minimum total cost over every injective assignment of targets to queries."""
    num_queries, num_targets = cost.shape
    return min(
        sum(cost[q, t].item() for t, q in enumerate(chosen))
        for chosen in itertools.permutations(range(num_queries), num_targets)
    )


@pytest.mark.parametrize("seed", range(5))
def test_matcher_total_cost_equals_brute_force_minimum(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    num_queries, num_targets, num_classes = 5, 3, 4
    mask_logits = torch.randn(1, num_queries, 3, 3, generator=generator) * 3
    class_logits = torch.randn(1, num_queries, num_classes + 1, generator=generator)
    masks = (torch.rand(num_targets, 6, 6, generator=generator) > 0.5).float()
    labels = torch.randint(num_classes, (num_targets,), generator=generator)
    matcher = HungarianMatcher(LossConfig(match_bce=1.0, match_dice=1.0, match_class=1.0))

    cost = matcher.cost_matrix(mask_logits[0], class_logits[0], masks, labels)
    # The vectorised cost agrees with the plain loss functions on every pair.
    resized = F.interpolate(mask_logits, size=(6, 6), mode="bilinear", align_corners=False)[0]
    probs = class_logits[0].softmax(-1)
    for q in range(num_queries):
        for t in range(num_targets):
            expected = (
                sigmoid_bce_loss(resized[q : q + 1], masks[t : t + 1])
                + dice_loss(resized[q : q + 1], masks[t : t + 1])
                - probs[q, labels[t]]
            )
            assert cost[q, t].item() == pytest.approx(expected.item(), abs=1e-5)

    [(query_idx, target_idx)] = matcher(mask_logits, class_logits, [masks], [labels])
    assert query_idx.dtype == torch.long and target_idx.dtype == torch.long
    assert sorted(target_idx.tolist()) == list(range(num_targets))
    assert len(set(query_idx.tolist())) == num_targets
    assert cost[query_idx, target_idx].sum().item() == pytest.approx(brute_force_cost(cost), abs=1e-5)


def test_softplus_sums_agree_with_torch_softplus_far_into_both_tails() -> None:
    logits = torch.cat([torch.linspace(-120, 120, 4000), torch.tensor([0.0, 1e-9, -1e-9, 88.7, -88.7])])
    logits = logits[torch.randperm(logits.numel(), generator=torch.Generator().manual_seed(0))].reshape(5, -1)
    expected = F.softplus(logits.double()).sum(dim=-1)
    assert torch.allclose(softplus_sums(logits).double(), expected, rtol=1e-6, atol=0)
    assert torch.isfinite(softplus_sums(torch.full((2, 5), 1e30))).all()  # no exp overflow


def test_matcher_rejects_more_targets_than_queries_and_accepts_none() -> None:
    matcher = HungarianMatcher(LossConfig())
    mask_logits, class_logits = torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 3)
    with pytest.raises(ValueError, match=r"3 target regions.*only 2 queries"):
        matcher(mask_logits, class_logits, [torch.zeros(1, 4, 4), torch.zeros(3, 4, 4)], [torch.zeros(1, dtype=torch.long), torch.zeros(3, dtype=torch.long)])
    [(q0, t0), _] = matcher(
        mask_logits, class_logits, [torch.zeros(0, 4, 4), torch.zeros(1, 4, 4)], [torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long)]
    )
    assert q0.numel() == 0 and t0.numel() == 0


def test_set_criterion_matches_then_weights_terms_and_no_object_class() -> None:
    torch.manual_seed(0)
    num_classes = 3
    config = LossConfig(bce_weight=5.0, dice_weight=5.0, class_weight=1.0, no_object_weight=0.1)
    criterion = SetCriterion(num_classes, config)
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1.0  # top half
    # Query 2 predicts exactly the target mask, queries 0 and 1 predict the bottom half.
    mask_logits = torch.full((1, 3, 4, 4), -4.0)
    mask_logits[0, :2, 2:] = 4.0
    mask_logits[0, 2, :2] = 4.0
    mask_logits.requires_grad_(True)
    class_logits = torch.randn(1, 3, num_classes + 1, requires_grad=True)
    aux_masks = mask_logits.detach()[..., ::2, ::2].clone()  # a coarser earlier layer
    outputs = PerceiverOutput(
        queries=torch.zeros(1, 3, 8),
        mask_logits=mask_logits,
        class_logits=class_logits,
        pixel_features=torch.zeros(1, 8, 4, 4),
        aux=[(aux_masks, class_logits.detach().clone())],
    )
    result = criterion(outputs, [target], [torch.tensor([1])])

    [(query_idx, target_idx)] = result.indices
    assert query_idx.tolist() == [2] and target_idx.tolist() == [0]
    losses = result.losses
    assert set(losses) == {"bce", "dice", "class", "aux0_bce", "aux0_dice", "aux0_class", "total"}
    torch.testing.assert_close(losses["bce"], sigmoid_bce_loss(mask_logits[0, 2:3], target))
    torch.testing.assert_close(losses["dice"], dice_loss(mask_logits[0, 2:3], target))
    # CE over all queries: query 2 -> class 1 (weight 1), queries 0/1 -> no-object (weight 0.1).
    log_probs = class_logits[0].log_softmax(-1)
    weights = torch.tensor([0.1, 0.1, 1.0])
    nll = -torch.stack([log_probs[0, 3], log_probs[1, 3], log_probs[2, 1]])
    torch.testing.assert_close(losses["class"], (weights * nll).sum() / weights.sum())
    expected_total = sum(
        5.0 * losses[p + "bce"] + 5.0 * losses[p + "dice"] + losses[p + "class"] for p in ("", "aux0_")
    )
    torch.testing.assert_close(result.total, expected_total)
    result.total.backward()
    assert mask_logits.grad is not None and mask_logits.grad[0, 2].abs().sum() > 0
    assert mask_logits.grad[0, :2].abs().sum() == 0, "unmatched queries get no mask loss"


def test_set_criterion_handles_an_image_without_regions() -> None:
    criterion = SetCriterion(2, LossConfig())
    outputs = PerceiverOutput(
        queries=torch.zeros(1, 2, 4),
        mask_logits=torch.zeros(1, 2, 4, 4, requires_grad=True),
        class_logits=torch.zeros(1, 2, 3, requires_grad=True),
        pixel_features=torch.zeros(1, 4, 4, 4),
    )
    result = criterion(outputs, [torch.zeros(0, 8, 8)], [torch.zeros(0, dtype=torch.long)])
    assert result.losses["bce"].item() == 0.0
    assert result.losses["class"].item() == pytest.approx(math.log(3.0), abs=1e-6)
    result.total.backward()
