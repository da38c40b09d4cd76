"""Stage 1: pre-train the Region Perceiver on segmentation data (encoder frozen)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medsight.config.schema import ExperimentConfig
from medsight.data.taxonomy import check_model_matches
from medsight.model.criterion import SetCriterion
from medsight.model.dice import hard_dice
from medsight.model.matcher import HungarianMatcher
from medsight.model.bundle import load_encoder, new_perceiver, save_modules, stage_taxonomy
from medsight.stages.segmentation_data import (
    SegmentationSplit,
    encode_split,
    iterate_batches,
    load_split,
)
from medsight.train.engine import TorchEngine
from medsight.train.loop import run_training, seeded_order
from medsight.train.tracker import Tracker


@torch.no_grad()
def matched_dice(
    perceiver: nn.Module,
    split: SegmentationSplit,
    matcher: HungarianMatcher,
    decode_fn=None,
    batch_size: int = 32,
) -> float:
    """Mean Dice over every ground-truth region, each paired with its Hungarian-matched query.

    ``decode_fn(out, batch) -> (mask_logits, class_logits)`` lets stage 2 score quantized
    queries with the same code.
    """
    perceiver.eval()
    scores = []
    for batch in iterate_batches(split, list(range(len(split))), batch_size):
        out = perceiver(batch["patch_tokens"])
        mask_logits, class_logits = out.mask_logits, out.class_logits
        if decode_fn is not None:
            mask_logits, class_logits = decode_fn(out, batch)
        indices = matcher(mask_logits, class_logits, batch["masks"], batch["labels"])
        for b, (query_index, target_index) in enumerate(indices):
            scores.append(hard_dice(mask_logits[b, query_index], batch["masks"][b][target_index]))
    return float(torch.cat(scores).mean())


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.perceiver_pretrain
    torch.manual_seed(stage.seed)
    taxonomy = stage_taxonomy(config, inputs)
    check_model_matches(config, taxonomy)  # before minutes of data loading, not after
    encoder = load_encoder(config, inputs)
    size = config.model.encoder.image_size
    train = load_split(inputs["data"], "train", size, stage.max_masks_per_image, taxonomy)
    val = load_split(inputs["data"], "val", size, stage.max_masks_per_image, taxonomy)
    test = load_split(inputs["data"], "test", size, stage.max_masks_per_image, taxonomy)
    for split in (train, val, test):
        encode_split(split, encoder)

    perceiver = new_perceiver(config, taxonomy)  # after the encoder: keeps the seeded init order
    matcher = HungarianMatcher(config.model.loss)
    criterion = SetCriterion(config.model.perceiver.num_classes, config.model.loss)
    engine = TorchEngine(perceiver, stage)

    def step(batch: dict) -> dict[str, torch.Tensor]:
        out = engine.model(batch["patch_tokens"])
        losses = criterion(out, batch["masks"], batch["labels"]).losses
        return {"loss": losses["total"], "bce": losses["bce"], "dice": losses["dice"], "ce": losses["class"]}

    steps_per_epoch = -(-len(train) // stage.batch_size)
    result = run_training(
        name="perceiver-pretrain",
        module=perceiver,
        engine=engine,
        make_batches=lambda epoch: iterate_batches(train, seeded_order(len(train), stage.seed, epoch), stage.batch_size),
        steps_per_epoch=steps_per_epoch,
        step_fn=step,
        config=stage,
        workdir=output,
        tracker=tracker,
    )
    save_modules(output, {"perceiver": perceiver}, taxonomy)
    metrics = {
        "val_dice": matched_dice(perceiver, val, matcher),
        "test_dice": matched_dice(perceiver, test, matcher),
        "train_steps": float(result.steps),
        **{f"final_{k}": v for k, v in result.last_losses.items()},
    }
    return metrics
