"""Segmentation losses: BCE + Dice on masks, cross-entropy on classes, Hungarian set criterion."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from medsight.config.schema import LossConfig
from medsight.model.dice import resize_mask_logits, soft_dice_loss
from medsight.model.matcher import HungarianMatcher


def _per_mask_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits/targets [K, ...] -> [K]: per-mask mean over pixels of the sigmoid BCE."""
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return loss.flatten(1).mean(dim=1)


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over pixels of each mask, then over masks.

    logits [K, H, W] (any trailing shape), targets same shape in {0, 1} -> scalar:
        mean_k mean_pixels [ -t log sigmoid(x) - (1 - t) log(1 - sigmoid(x)) ].
    K = 0 gives 0 (still connected to the graph, so callers can always backpropagate).
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return _per_mask_bce(logits, targets).mean()


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss averaged over masks.

    logits [K, H, W] (any trailing shape), targets same shape in {0, 1} -> scalar:
        mean_k [ 1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1) ],  p = sigmoid(logits),
    sums over the pixels of mask k; the +1 keeps empty masks finite. K = 0 gives 0.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return soft_dice_loss(logits, targets).mean()


def ordered_mask_loss(pred_logits: torch.Tensor, gt_masks: torch.Tensor, loss_config: LossConfig) -> torch.Tensor:
    """pred_logits [K, h, w], gt_masks [K, H, W] paired in order (no matching) -> scalar.

    bce_weight * BCE + dice_weight * Dice after resizing predictions to the ground-truth size.
    Used when masks are supervised in region-token order (stages 4-5).
    """
    if pred_logits.shape[0] != gt_masks.shape[0]:
        raise ValueError(f"{pred_logits.shape[0]} predicted masks for {gt_masks.shape[0]} ground-truth masks")
    resized = resize_mask_logits(pred_logits, tuple(gt_masks.shape[-2:]))
    return loss_config.bce_weight * sigmoid_bce_loss(resized, gt_masks) + loss_config.dice_weight * dice_loss(
        resized, gt_masks
    )


class SegmentationPrediction(Protocol):
    """What the criterion reads: PerceiverOutput, or the same built from quantized queries."""

    mask_logits: torch.Tensor  # [B, Q, h, w]
    class_logits: torch.Tensor  # [B, Q, C+1]
    aux: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CriterionOutput:
    """losses: unweighted terms per layer ("bce", "dice", "class", "aux{i}_bce", ...) plus the
    weighted sum "total"; indices: final-layer matching, per image (query_idx, target_idx)."""

    losses: dict[str, torch.Tensor]
    indices: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def total(self) -> torch.Tensor:
        return self.losses["total"]


class SetCriterion(nn.Module):
    """Mask2Former-style set loss: match, then BCE + Dice on matched masks and CE on all queries.

    Unmatched queries are trained towards the no-object class (last index) with class weight
    `no_object_weight`, so that the many empty queries do not swamp the few matched ones.
    The same loss is applied to the final prediction and to every aux prediction, each with its
    own matching (earlier layers may rank queries differently).
    """

    def __init__(
        self,
        num_classes: int,
        loss_config: LossConfig,
        mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """``mean_over_ranks`` (data-parallel training): the mean of a tensor over the ranks. The
        mask and class terms are then normalised by the global batch's mean count per rank
        instead of the local count, so averaging the ranks' gradients (DDP) gives exactly the
        gradient of the global batch's loss. None (one process): plain means."""
        super().__init__()
        self.num_classes = num_classes
        self.loss_config = loss_config
        self.mean_over_ranks = mean_over_ranks
        self.matcher = HungarianMatcher(loss_config)
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = loss_config.no_object_weight
        self.register_buffer("class_weight", class_weight, persistent=False)

    def layer_losses(
        self,
        mask_logits: torch.Tensor,
        class_logits: torch.Tensor,
        target_masks: list[torch.Tensor],
        target_labels: list[torch.Tensor],
        norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """One prediction layer: mask_logits [B, Q, h, w], class_logits [B, Q, C+1] -> (bce, dice, class), matches.

        ``norms``: (masks, class weight) per rank of the global batch, replacing the local counts."""
        indices = self.matcher(mask_logits, class_logits, target_masks, target_labels)
        # Every query defaults to no-object; matched ones get their target's label.
        target_classes = torch.full(class_logits.shape[:2], self.num_classes, dtype=torch.long, device=class_logits.device)
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(mask_logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(mask_logits.device)
        if query_idx.numel():
            # One gather for the whole batch: indexing image by image would make autograd build
            # a full-size zero gradient per image and dominate the step time.
            gt = torch.cat([target_masks[b][t.to(target_masks[b].device)] for b, (_, t) in enumerate(indices)])  # [R, H, W]
            pred = resize_mask_logits(mask_logits[batch_idx, query_idx], tuple(gt.shape[-2:]))  # [R, H, W]
            # Mean over all matched masks of the batch, so images with many regions weigh more.
            if norms is None:
                bce = _per_mask_bce(pred, gt).mean()
                dice = soft_dice_loss(pred, gt).mean()
            else:
                bce = _per_mask_bce(pred, gt).sum() / norms[0]
                dice = soft_dice_loss(pred, gt).sum() / norms[0]
            labels = torch.cat([target_labels[b].to(class_logits.device)[t.to(class_logits.device)] for b, (_, t) in enumerate(indices)])
            target_classes[batch_idx, query_idx] = labels
        else:
            bce = dice = mask_logits.sum() * 0.0
        if norms is None:
            ce = F.cross_entropy(class_logits.transpose(1, 2).float(), target_classes, weight=self.class_weight)
        else:
            each = F.cross_entropy(class_logits.transpose(1, 2).float(), target_classes, reduction="none")  # [B, Q]
            ce = (each * self.class_weight[target_classes]).sum() / norms[1]
        return {"bce": bce, "dice": dice, "class": ce}, indices

    def _global_norms(self, class_logits: torch.Tensor, target_labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Matched masks and summed class weight of this rank's batch, averaged over ranks.
        Every query is matched to at most one region and every region is matched, so both
        counts are known before matching and are the same for every layer: one all-reduce."""
        if self.mean_over_ranks is None:
            return None
        labels = torch.cat([t.to(self.class_weight.device) for t in target_labels]) if target_labels else torch.zeros(0, dtype=torch.long)
        regions = float(labels.numel())
        unmatched = class_logits.shape[0] * class_logits.shape[1] - regions
        weight = float(self.class_weight[labels].sum()) + unmatched * float(self.class_weight[-1])
        local = torch.tensor([regions, weight], dtype=torch.float32, device=class_logits.device)
        masks, classes = self.mean_over_ranks(local).clamp_min(1e-6).unbind()
        return masks, classes

    def forward(
        self,
        outputs: SegmentationPrediction,
        target_masks: list[torch.Tensor],
        target_labels: list[torch.Tensor],
    ) -> CriterionOutput:
        """outputs (mask_logits [B,Q,h,w], class_logits [B,Q,C+1], aux), per image masks [R,H,W] + labels [R]."""
        config = self.loss_config
        layers = [("", outputs.mask_logits, outputs.class_logits)]
        layers += [(f"aux{i}_", masks, classes) for i, (masks, classes) in enumerate(outputs.aux)]
        losses: dict[str, torch.Tensor] = {}
        total = outputs.mask_logits.new_zeros(())
        final_indices: list[tuple[torch.Tensor, torch.Tensor]] = []
        norms = self._global_norms(outputs.class_logits, target_labels)
        for prefix, mask_logits, class_logits in layers:
            terms, indices = self.layer_losses(mask_logits, class_logits, target_masks, target_labels, norms)
            if not prefix:
                final_indices = indices
            total = total + (
                config.bce_weight * terms["bce"] + config.dice_weight * terms["dice"] + config.class_weight * terms["class"]
            )
            losses.update({prefix + name: value for name, value in terms.items()})
        losses["total"] = total
        return CriterionOutput(losses=losses, indices=final_indices)
