"""Hungarian matching of predicted regions (queries) to ground-truth regions, per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from medsight.config.schema import LossConfig
from medsight.model.dice import pairwise_soft_dice, resize_mask_logits


def softplus_sums(logits: torch.Tensor) -> torch.Tensor:
    """sum_p softplus(logits[..., p]): [..., P] -> [...].

    As max(x, 0) + log(1 + exp(-|x|)) with in-place steps: torch's CPU softplus goes through a
    scalar log1p and took 4x longer on the matcher's [B, Q, H*W] logits (a fifth of a tiny
    perceiver step). Where exp(-|x|) is below float eps the log term rounds to 0 (error < 6e-8 per
    pixel); the costs only rank candidate matches, and no gradient flows through them.
    """
    return logits.abs().neg_().exp_().add_(1).log_().sum(dim=-1) + logits.clamp(min=0).sum(dim=-1)


def pairwise_sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor,
                         softplus_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-pixel BCE of every prediction against every target: [Q, P] x [R, P] -> [Q, R].

    BCE(x, t) = softplus(x) - t * x, so the pixel sums become one row sum and one matrix
    product instead of a [Q, R, P] tensor. ``softplus_sum`` [Q]: the row sums, when the caller
    computed them for a whole batch at once.
    """
    num_pixels = logits.shape[1]
    if softplus_sum is None:
        softplus_sum = softplus_sums(logits)
    return (softplus_sum[:, None] - logits @ targets.t()) / num_pixels


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth regions minimising a mask + class cost.

    cost[q, t] = match_bce * BCE(q, t) + match_dice * Dice(q, t) - match_class * softmax(class_q)[label_t],
    with predicted logits resized bilinearly to each image's ground-truth mask size (matching at
    full ground-truth resolution, no point sampling).
    """

    def __init__(self, loss_config: LossConfig) -> None:
        super().__init__()
        self.cost_bce = loss_config.match_bce
        self.cost_dice = loss_config.match_dice
        self.cost_class = loss_config.match_class

    def cost_matrix(
        self, mask_logits: torch.Tensor, class_logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """One image: mask_logits [Q, h, w], class_logits [Q, C+1], masks [R, H, W], labels [R] -> cost [Q, R]."""
        resized = resize_mask_logits(mask_logits.float(), tuple(masks.shape[-2:]))
        return self._cost_at_target_size(resized, class_logits, masks, labels)

    def _cost_at_target_size(
        self, resized_logits: torch.Tensor, class_logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
        softplus_sum: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """resized_logits [Q, H, W] already at the masks' size, class_logits [Q, C+1], masks [R, H, W] -> [Q, R]."""
        flat_logits = resized_logits.flatten(1).float()  # [Q, H*W]
        flat_targets = masks.flatten(1).to(flat_logits.dtype)  # [R, H*W]
        class_prob = class_logits.float().softmax(dim=-1)[:, labels.long()]  # [Q, R]
        return (
            self.cost_bce * pairwise_sigmoid_bce(flat_logits, flat_targets, softplus_sum)
            + self.cost_dice * pairwise_soft_dice(flat_logits, flat_targets)
            - self.cost_class * class_prob
        )

    @torch.no_grad()
    def forward(
        self,
        mask_logits: torch.Tensor,
        class_logits: torch.Tensor,
        target_masks: list[torch.Tensor],
        target_labels: list[torch.Tensor],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """mask_logits [B, Q, h, w], class_logits [B, Q, C+1], per image masks [R_b, H, W] and labels [R_b].

        Returns per image (query_idx [R_b], target_idx [R_b]) LongTensors on CPU, sorted by query.
        """
        num_queries = mask_logits.shape[1]
        # One bilinear resize of the whole batch per distinct ground-truth size (usually one), and
        # the BCE cost's per-query softplus sums with it.
        resized_by_size: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        matches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for image, (masks, labels) in enumerate(zip(target_masks, target_labels)):
            num_targets = masks.shape[0]
            if num_targets > num_queries:
                raise ValueError(
                    f"image {image} has {num_targets} target regions but the perceiver has only "
                    f"{num_queries} queries; drop images with more regions than queries"
                )
            if num_targets == 0:
                empty = torch.empty(0, dtype=torch.long)
                matches.append((empty, empty.clone()))
                continue
            size = (int(masks.shape[-2]), int(masks.shape[-1]))
            if size not in resized_by_size:
                resized = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False)  # [B, Q, H, W]
                resized_by_size[size] = resized, softplus_sums(resized.flatten(2))  # [B, Q]
            resized, softplus_sum = resized_by_size[size]
            cost = self._cost_at_target_size(resized[image], class_logits[image], masks, labels, softplus_sum[image])
            query_idx, target_idx = linear_sum_assignment(cost.cpu().numpy())
            matches.append(
                (torch.as_tensor(query_idx, dtype=torch.long), torch.as_tensor(target_idx, dtype=torch.long))
            )
        return matches
