"""Stage 2: modality-aware codebook pre-training (VQ + L2 + grounding loss with quantized queries).

Only the codebook (C, P_q, P_d and the CLS modality predictor) trains; the perceiver is frozen
but its mask and class heads still carry the grounding loss back to the quantized queries.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from medsight.config.schema import ExperimentConfig
from medsight.data.taxonomy import check_model_matches
from medsight.model.codebook import ModalityCodebook
from medsight.model.criterion import SetCriterion
from medsight.model.matcher import HungarianMatcher
from medsight.model.bundle import (
    copy_modules,
    find_modules,
    load_encoder,
    load_module,
    new_codebook,
    new_perceiver,
    save_modules,
    stage_taxonomy,
)
from medsight.stages.perceiver_pretrain import matched_dice
from medsight.stages.segmentation_data import SegmentationSplit, encode_split, iterate_batches, load_split
from medsight.train.engine import TorchEngine
from medsight.train.loop import run_training, seeded_order
from medsight.train.tracker import Tracker

RESEED_EVERY = 25  # steps between dead-code reseeds; only during the first half of training


@torch.no_grad()
def _all_queries(perceiver: nn.Module, split: SegmentationSplit) -> torch.Tensor:
    return torch.cat([perceiver(b["patch_tokens"]).queries for b in iterate_batches(split, list(range(len(split))), 64)])


@torch.no_grad()
def codes_used_by_regions(
    perceiver: nn.Module, codebook: ModalityCodebook, split: SegmentationSplit, matcher: HungarianMatcher
) -> dict[int, int]:
    """Distinct codes that ground-truth regions are assigned to, per modality id."""
    used: dict[int, set[int]] = {}
    for batch in iterate_batches(split, list(range(len(split))), 64):
        out = perceiver(batch["patch_tokens"])
        quantized = codebook(out.queries, batch["modality"])
        masks, classes = codebook.decode(perceiver, quantized.quantized, out.pixel_features)
        for b, (query_index, _) in enumerate(matcher(masks, classes, batch["masks"], batch["labels"])):
            modality = int(batch["modality"][b])
            used.setdefault(modality, set()).update(quantized.indices[b, query_index].tolist())
    return {m: len(codes) for m, codes in sorted(used.items())}


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.codebook_pretrain
    torch.manual_seed(stage.seed)
    taxonomy = stage_taxonomy(config, inputs)
    check_model_matches(config, taxonomy)  # before minutes of data loading, not after
    modules = find_modules(inputs)
    encoder = load_encoder(config, inputs)
    perceiver = load_module(new_perceiver(config, taxonomy), modules, "perceiver", "perceiver-pretrain")
    perceiver.requires_grad_(False).eval()
    size = config.model.encoder.image_size
    splits = {name: load_split(inputs["data"], name, size, stage.max_masks_per_image, taxonomy) for name in ("train", "val", "test")}
    for split in splits.values():
        encode_split(split, encoder)
    train = splits["train"]

    codebook = new_codebook(config, taxonomy)  # after the encoder: keeps the seeded init order
    generator = torch.Generator().manual_seed(stage.seed)
    codebook.initialize_codes(_all_queries(perceiver, train), train.modality, generator)
    criterion = SetCriterion(config.model.perceiver.num_classes, config.model.loss)
    engine = TorchEngine(codebook, stage)
    usage = torch.zeros(codebook.num_modalities, codebook.codes_per_modality, dtype=torch.long)
    steps_per_epoch = -(-len(train) // stage.batch_size)
    reseed_until = int(stage.epochs * steps_per_epoch) // 2
    state = {"step": 0}

    def step(batch: dict) -> dict[str, torch.Tensor]:
        nonlocal usage
        with torch.no_grad():
            out = perceiver(batch["patch_tokens"])
        quantized = engine.model(out.queries, batch["modality"])
        mask_logits, class_logits = codebook.decode(perceiver, quantized.quantized, out.pixel_features)
        prediction = SimpleNamespace(mask_logits=mask_logits, class_logits=class_logits, aux=[])
        grounding = criterion(prediction, batch["masks"], batch["labels"]).total
        loss = quantized.vq_loss + quantized.recon_loss + grounding
        losses = {"vq": quantized.vq_loss, "recon": quantized.recon_loss, "grounding": grounding}
        if codebook.modality_predictor is not None:
            modality_ce = F.cross_entropy(codebook.predict_modality(batch["cls_tokens"]), batch["modality"])
            loss = loss + modality_ce
            losses["modality_ce"] = modality_ce
        usage += codebook.count_usage(quantized.indices.detach(), batch["modality"])
        state["step"] += 1
        if state["step"] % RESEED_EVERY == 0 and state["step"] <= reseed_until:
            codebook.reseed_dead_codes(quantized.z, batch["modality"], usage, generator)
            usage.zero_()
        return {"loss": loss, **losses}

    result = run_training(
        name="codebook-pretrain",
        module=codebook,
        engine=engine,
        make_batches=lambda epoch: iterate_batches(train, seeded_order(len(train), stage.seed, epoch), stage.batch_size),
        steps_per_epoch=steps_per_epoch,
        step_fn=step,
        config=stage,
        workdir=output,
        tracker=tracker,
    )
    codebook.eval()
    save_modules(output, {"codebook": codebook}, taxonomy)
    copy_modules(modules, output, ("perceiver",))

    matcher = HungarianMatcher(config.model.loss)
    def quantize(out, batch):
        return codebook.decode(perceiver, codebook(out.queries, batch["modality"]).quantized, out.pixel_features)

    metrics: dict[str, float] = {"train_steps": float(result.steps)}
    for name in ("val", "test"):
        continuous = matched_dice(perceiver, splits[name], matcher)
        discrete = matched_dice(perceiver, splits[name], matcher, decode_fn=quantize)
        metrics[f"{name}_dice"] = continuous
        metrics[f"{name}_dice_quantized"] = discrete
        metrics[f"{name}_dice_retention"] = discrete / max(continuous, 1e-6)
    used = codes_used_by_regions(perceiver, codebook, splits["test"], matcher)
    metrics["dice_retention"] = metrics["test_dice_retention"]
    metrics["min_codes_used_per_modality"] = float(min(used.values()))
    metrics.update({f"codes_used_modality_{m}": float(n) for m, n in used.items()})
    if codebook.modality_predictor is not None:
        with torch.no_grad():
            predicted = codebook.predict_modality(splits["test"].cls_tokens).argmax(-1)
        metrics["test_modality_accuracy"] = float((predicted == splits["test"].modality).float().mean())
    return metrics
