"""Dice, in the three forms the method needs, over one resize policy.

- ``soft_dice_loss``: the differentiable per-mask loss of the set criterion (stages 1, 2, 4, 5);
- ``pairwise_soft_dice``: the same formula for every (query, region) pair, the matcher's cost;
- ``hard_dice``: the thresholded score that training validation and evaluation both report.

Predictions are always logits resized bilinearly to the ground-truth size before anything
else (``resize_mask_logits``), as Mask2Former does. Probabilities are turned back into logits
first, so validation Dice (from logits) and evaluation Dice (from the decoded probabilities)
are one computation and cannot disagree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Probabilities are clamped this far from 0/1 before the logit, so a saturated mask stays finite.
_PROBABILITY_EPS = 1e-6


def resize_mask_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[K, h, w] -> [K, H, W], bilinear on logits (never on thresholded masks)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    if logits.shape[0] == 0:
        return logits.new_zeros((0, *size))
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


def probabilities_to_logits(probabilities: torch.Tensor) -> torch.Tensor:
    """Inverse sigmoid of [K, H, W] probabilities (or booleans), so they share the logit path."""
    return torch.logit(probabilities.float().clamp(_PROBABILITY_EPS, 1 - _PROBABILITY_EPS))


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[K, ...] logits and {0, 1} targets -> [K]: 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), p = sigmoid.

    The +1 keeps an empty mask finite and its gradient defined.
    """
    probs = logits.sigmoid().flatten(1)
    flat_targets = targets.flatten(1).to(probs.dtype)
    numerator = 2.0 * (probs * flat_targets).sum(dim=1) + 1.0
    denominator = probs.sum(dim=1) + flat_targets.sum(dim=1) + 1.0
    return 1.0 - numerator / denominator


def pairwise_soft_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``soft_dice_loss`` for every pair: logits [Q, P], targets [R, P] -> [Q, R] (one matmul)."""
    probs = logits.sigmoid()
    intersection = probs @ targets.t()  # [Q, R]
    totals = probs.sum(dim=1)[:, None] + targets.sum(dim=1)[None, :]  # [Q, R]
    return 1.0 - (2.0 * intersection + 1.0) / (totals + 1.0)


def hard_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask Dice of sigmoid(logits) > 0.5 against targets > 0.5: [K, h, w], [K, H, W] -> [K].

    Predictions are resized to the targets' size first. Both empty scores 1 (nothing to find,
    nothing found); one empty and the other not scores 0.
    """
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"hard_dice: {logits.shape[0]} predicted masks for {targets.shape[0]} targets")
    predicted = (resize_mask_logits(logits, tuple(targets.shape[-2:])) > 0).flatten(1)
    truth = (targets > 0.5).flatten(1) if targets.dtype != torch.bool else targets.flatten(1)
    intersection = (predicted & truth).sum(1).float()
    total = (predicted.sum(1) + truth.sum(1)).float()
    return torch.where(total > 0, 2 * intersection / total.clamp(min=1), torch.ones_like(total))


def hard_dice_of_probabilities(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``hard_dice`` for decoded probabilities (what inference returns): [K, h, w], [K, H, W] -> [K]."""
    return hard_dice(probabilities_to_logits(probabilities), targets)
