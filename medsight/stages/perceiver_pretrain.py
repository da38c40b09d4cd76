"""Stage 1: pre-train the Region Perceiver on segmentation data (encoder frozen).

Data-parallel with DDP: each rank streams its share of every epoch from disk, runs the frozen
encoder on its device inside the step, and rank 0 alone writes the weights and metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from medsight.config.schema import ExperimentConfig
from medsight.data.taxonomy import check_model_matches
from medsight.model.bundle import save_modules, stage_taxonomy
from medsight.model.criterion import SetCriterion
from medsight.model.dice import hard_dice
from medsight.model.matcher import HungarianMatcher
from medsight.model.vision_modules import load_encoder, new_perceiver
from medsight.stages.segmentation_data import (
    FrozenEncoder,
    SegmentationSamples,
    eval_loader,
    iterate,
    load_split,
    train_loader,
)
from medsight.train import distributed
from medsight.train.data import EpochBatches, to_device
from medsight.train.engine import TorchEngine
from medsight.train.loop import run_training
from medsight.train.tracker import Tracker

EVAL_BATCH = 32


def set_criterion(config: ExperimentConfig) -> SetCriterion:
    """The set loss, normalised over the global batch when several ranks train."""
    reduce = distributed.all_reduce_mean if distributed.active() else None
    return SetCriterion(config.model.perceiver.num_classes, config.model.loss, reduce)


@torch.no_grad()
def matched_dice(
    perceiver: nn.Module,
    samples: SegmentationSamples,
    encoder: FrozenEncoder,
    matcher: HungarianMatcher,
    decode_fn: Callable | None = None,
    num_workers: int = 0,
) -> float:
    """Mean Dice over every ground-truth region, each paired with its Hungarian-matched query;
    each rank scores its shard, the sums are added over ranks.

    ``decode_fn(out, batch) -> (mask_logits, class_logits)`` lets stage 2 score quantized
    queries with the same code.
    """
    perceiver.eval()
    total = count = 0.0
    for batch in iterate(eval_loader(samples, EVAL_BATCH, num_workers), encoder.device):
        out = perceiver(encoder(batch).patch_tokens)
        mask_logits, class_logits = out.mask_logits, out.class_logits
        if decode_fn is not None:
            mask_logits, class_logits = decode_fn(out, batch)
        indices = matcher(mask_logits, class_logits, batch["masks"], batch["labels"])
        for b, (query_index, target_index) in enumerate(indices):
            scores = hard_dice(mask_logits[b, query_index.to(mask_logits.device)].float(),
                               batch["masks"][b][target_index.to(mask_logits.device)])
            total += float(scores.sum())
            count += scores.numel()
    summed = distributed.sum_over_ranks({"total": total, "count": count})
    return summed["total"] / max(summed["count"], 1.0)


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.perceiver_pretrain
    torch.manual_seed(stage.seed)
    taxonomy = stage_taxonomy(config, inputs)
    check_model_matches(config, taxonomy)  # before minutes of data loading, not after
    size = config.model.encoder.image_size
    train, val, test = (load_split(inputs["data"], split, size, stage.max_masks_per_image, taxonomy,
                                   stage.feature_cache_mb, on_too_many=config.data.too_many_masks)
                        for split in ("train", "val", "test"))
    encoder_module = load_encoder(config, inputs)
    perceiver = new_perceiver(config, taxonomy)  # after the encoder: keeps the seeded init order
    engine = TorchEngine(perceiver, stage, bf16=stage.bf16)
    encoder = FrozenEncoder(encoder_module, engine.device, stage.feature_cache_mb)
    matcher = HungarianMatcher(config.model.loss)
    criterion = set_criterion(config).to(engine.device)

    def step(batch: dict) -> dict[str, torch.Tensor]:
        batch = to_device(batch, engine.device, engine.dtype)
        out = engine.model(encoder(batch).patch_tokens)
        losses = criterion(out, batch["masks"], batch["labels"]).losses
        return {"loss": losses["total"], "bce": losses["bce"], "dice": losses["dice"], "ce": losses["class"]}

    batches = EpochBatches(train_loader(train, stage.batch_size, stage.seed, stage.num_workers))
    result = run_training(
        name="perceiver-pretrain",
        engine=engine,
        make_batches=batches,
        steps_per_epoch=batches.steps_per_epoch,
        step_fn=step,
        config=stage,
        workdir=output,
        tracker=tracker,
    )
    if distributed.is_main():
        save_modules(output, {"perceiver": perceiver}, taxonomy)
    with engine.autocast():
        metrics = {
            "val_dice": matched_dice(perceiver, val, encoder, matcher, num_workers=stage.num_workers),
            "test_dice": matched_dice(perceiver, test, encoder, matcher, num_workers=stage.num_workers),
        }
    return {**metrics, "train_steps": float(result.steps), **{f"final_{k}": v for k, v in result.last_losses.items()}}
