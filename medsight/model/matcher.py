"""Hungarian matching of predicted regions (queries) to ground-truth regions, per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from medsight.config.schema import LossConfig


def pairwise_sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel BCE of every prediction against every target: [..., Q, P] x [..., R, P] -> [..., Q, R].

    BCE(x, t) = softplus(x) - t * x, so the pixel sums become one row sum and one matrix
    product instead of a [Q, R, P] tensor.
    """
    num_pixels = logits.shape[-1]
    return (F.softplus(logits).sum(dim=-1, keepdim=True) - logits @ targets.transpose(-1, -2)) / num_pixels


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss 1 - (2 sum(p t) + 1) / (sum p + sum t + 1) for every pair: [..., Q, P] x [..., R, P] -> [..., Q, R]."""
    probs = logits.sigmoid()
    intersection = probs @ targets.transpose(-1, -2)  # [..., Q, R]
    totals = probs.sum(dim=-1).unsqueeze(-1) + targets.sum(dim=-1).unsqueeze(-2)  # [..., Q, R]
    return 1.0 - (2.0 * intersection + 1.0) / (totals + 1.0)


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
        resized = F.interpolate(mask_logits[None].float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        return self._batched_cost(resized.flatten(2), class_logits[None], masks[None].flatten(2), labels[None])[0]

    def _batched_cost(
        self, flat_logits: torch.Tensor, class_logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """flat_logits [B, Q, P] at the targets' size, class_logits [B, Q, C+1], targets [B, R, P], labels [B, R] -> [B, Q, R].

        Images with fewer regions are zero-padded to R; their padded columns are sliced off before
        assignment, so padding never changes a match.
        """
        flat_logits = flat_logits.float()
        targets = targets.to(flat_logits.dtype)
        class_prob = class_logits.float().softmax(dim=-1)  # [B, Q, C+1]
        index = labels.long()[:, None, :].expand(-1, class_prob.shape[1], -1)  # [B, Q, R]
        return (
            self.cost_bce * pairwise_sigmoid_bce(flat_logits, targets)
            + self.cost_dice * pairwise_dice(flat_logits, targets)
            - self.cost_class * class_prob.gather(2, index)
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
        empty = torch.empty(0, dtype=torch.long)
        matches: list[tuple[torch.Tensor, torch.Tensor]] = [(empty, empty.clone()) for _ in target_masks]
        # Costs of all images with the same ground-truth size come from one batched resize and one
        # batched matmul: a per-image loop of small ops dominated the perceiver's step on CPU.
        images_by_size: dict[tuple[int, int], list[int]] = {}
        for image, masks in enumerate(target_masks):
            if masks.shape[0] > num_queries:
                raise ValueError(
                    f"image {image} has {masks.shape[0]} target regions but the perceiver has only "
                    f"{num_queries} queries; drop images with more regions than queries"
                )
            if masks.shape[0]:
                images_by_size.setdefault((int(masks.shape[-2]), int(masks.shape[-1])), []).append(image)
        for size, images in images_by_size.items():
            picked = torch.as_tensor(images, device=mask_logits.device)
            resized = F.interpolate(mask_logits[picked].float(), size=size, mode="bilinear", align_corners=False)
            counts = [int(target_masks[i].shape[0]) for i in images]
            padded_masks = resized.new_zeros(len(images), max(counts), size[0] * size[1])  # [b, R, P]
            padded_labels = torch.zeros(len(images), max(counts), dtype=torch.long, device=mask_logits.device)
            for row, (image, count) in enumerate(zip(images, counts)):
                padded_masks[row, :count] = target_masks[image].flatten(1).to(padded_masks)
                padded_labels[row, :count] = target_labels[image].to(padded_labels)
            costs = self._batched_cost(resized.flatten(2), class_logits[picked], padded_masks, padded_labels).cpu().numpy()
            for row, (image, count) in enumerate(zip(images, counts)):
                query_idx, target_idx = linear_sum_assignment(costs[row, :, :count])
                matches[image] = (torch.as_tensor(query_idx, dtype=torch.long), torch.as_tensor(target_idx, dtype=torch.long))
        return matches
