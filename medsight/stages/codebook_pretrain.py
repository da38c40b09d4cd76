"""Stage 2: modality-aware codebook pre-training (VQ + L2 + grounding loss with quantized queries).

Only the codebook (C, P_q, P_d and the CLS modality predictor) trains; the perceiver is frozen
but its mask and class heads still carry the grounding loss back to the quantized queries.
Data-parallel like stage 1; dead-code reseeding sees every rank's batch, so the ranks' codebooks
stay identical.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from medsight.config.schema import ExperimentConfig
from medsight.data.taxonomy import check_model_matches
from medsight.model.bundle import copy_modules, find_modules, load_module, save_modules, stage_taxonomy
from medsight.model.codebook import ModalityCodebook
from medsight.model.matcher import HungarianMatcher
from medsight.model.vision_modules import load_encoder, new_codebook, new_perceiver
from medsight.stages.perceiver_pretrain import matched_dice, set_criterion
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

RESEED_EVERY = 25  # steps between dead-code reseeds; only during the first half of training
INIT_BATCH = 64


class CodebookStep(nn.Module):
    """Everything that trains in one forward call, so DDP sees every trained parameter used."""

    def __init__(self, codebook: ModalityCodebook):
        super().__init__()
        self.codebook = codebook

    def forward(self, queries: torch.Tensor, modality: torch.Tensor, cls_tokens: torch.Tensor):
        quantized = self.codebook(queries, modality)
        logits = self.codebook.predict_modality(cls_tokens) if self.codebook.modality_predictor is not None else None
        return quantized, logits


class ReseedState:
    """Usage counts, the step counter and the reseed generator: restored on resume."""

    def __init__(self, codebook: ModalityCodebook, seed: int):
        self.usage = torch.zeros(codebook.num_modalities, codebook.codes_per_modality, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"usage": self.usage.clone(), "generator": self.generator.get_state(), "step": torch.tensor(self.step)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.usage = tensors["usage"].clone()
        self.generator.set_state(tensors["generator"])
        self.step = int(tensors["step"])


def _interleaved(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's [B, ...] batch as one [W*B, ...] in global sample order (rank r's j-th sample
    is sample j*W + r of the epoch), so reseeding draws what one process would."""
    gathered = distributed.all_gather_tensor(tensor)  # [W, B, ...]
    return gathered.transpose(0, 1).flatten(0, 1)


@torch.no_grad()
def _initial_queries(perceiver: nn.Module, train: SegmentationSamples, encoder: FrozenEncoder,
                     limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Region queries [N, Q, d] and modalities [N] of the first ``limit`` training images
    (bounded, whatever the dataset's size). Every rank computes the same, in the same order."""
    subset = torch.utils.data.Subset(train, range(min(limit, len(train))))
    queries, modality = [], []
    for batch in iterate(eval_loader(subset, INIT_BATCH, shard=False), encoder.device):
        queries.append(perceiver(encoder(batch).patch_tokens).queries.float())
        modality.append(batch["modality"])
    return torch.cat(queries), torch.cat(modality)


@torch.no_grad()
def codes_used_by_regions(
    perceiver: nn.Module, codebook: ModalityCodebook, samples: SegmentationSamples,
    encoder: FrozenEncoder, matcher: HungarianMatcher,
) -> dict[int, int]:
    """Distinct codes that ground-truth regions are assigned to, per modality id (all ranks' shards)."""
    used: dict[int, set[int]] = {}
    for batch in iterate(eval_loader(samples, INIT_BATCH), encoder.device):
        out = perceiver(encoder(batch).patch_tokens)
        quantized = codebook(out.queries, batch["modality"])
        masks, classes = codebook.decode(perceiver, quantized.quantized, out.pixel_features)
        for b, (query_index, _) in enumerate(matcher(masks, classes, batch["masks"], batch["labels"])):
            modality = int(batch["modality"][b])
            used.setdefault(modality, set()).update(quantized.indices[b, query_index.to(masks.device)].tolist())
    merged: dict[int, set[int]] = {}
    for part in distributed.all_gather_objects(used):
        for modality, codes in part.items():
            merged.setdefault(modality, set()).update(codes)
    return {m: len(codes) for m, codes in sorted(merged.items())}


@torch.no_grad()
def modality_accuracy(codebook: ModalityCodebook, samples: SegmentationSamples, encoder: FrozenEncoder) -> float:
    right = total = 0.0
    for batch in iterate(eval_loader(samples, INIT_BATCH), encoder.device):
        predicted = codebook.predict_modality(encoder(batch).cls_tokens).argmax(-1)
        right += float((predicted == batch["modality"]).sum())
        total += predicted.numel()
    summed = distributed.sum_over_ranks({"right": right, "total": total})
    return summed["right"] / max(summed["total"], 1.0)


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    stage = config.codebook_pretrain
    torch.manual_seed(stage.seed)
    taxonomy = stage_taxonomy(config, inputs)
    check_model_matches(config, taxonomy)  # before minutes of data loading, not after
    modules = find_modules(inputs)
    encoder_module = load_encoder(config, inputs)
    perceiver = load_module(new_perceiver(config, taxonomy), modules, "perceiver", "perceiver-pretrain")
    perceiver.requires_grad_(False).eval()
    size = config.model.encoder.image_size
    splits = {name: load_split(inputs["data"], name, size, stage.max_masks_per_image, taxonomy, stage.feature_cache_mb,
                               on_too_many=config.data.too_many_masks)
              for name in ("train", "val", "test")}
    train = splits["train"]

    codebook = new_codebook(config, taxonomy)  # after the encoder: keeps the seeded init order
    device = distributed.device()
    perceiver.to(device)
    codebook.to(device)
    encoder = FrozenEncoder(encoder_module, device, stage.feature_cache_mb)
    state = ReseedState(codebook, stage.seed)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=stage.bf16):
        queries, modality = _initial_queries(perceiver, train, encoder, stage.init_images)
    codebook.initialize_codes(queries, modality, state.generator)
    del queries, modality
    # Every rank initialised the same codes; DDP starts them all from rank 0's copy.
    engine = TorchEngine(CodebookStep(codebook), stage, bf16=stage.bf16)
    criterion = set_criterion(config).to(device)
    batches = EpochBatches(train_loader(train, stage.batch_size, stage.seed, stage.num_workers))
    reseed_until = int(stage.epochs * batches.steps_per_epoch) // 2

    def step(batch: dict) -> dict[str, torch.Tensor]:
        batch = to_device(batch, device, engine.dtype)
        features = encoder(batch)
        with torch.no_grad():
            out = perceiver(features.patch_tokens)
        quantized, modality_logits = engine.model(out.queries, batch["modality"], features.cls_tokens)
        mask_logits, class_logits = codebook.decode(perceiver, quantized.quantized, out.pixel_features)
        prediction = SimpleNamespace(mask_logits=mask_logits, class_logits=class_logits, aux=[])
        grounding = criterion(prediction, batch["masks"], batch["labels"]).total
        loss = quantized.vq_loss + quantized.recon_loss + grounding
        losses = {"vq": quantized.vq_loss, "recon": quantized.recon_loss, "grounding": grounding}
        if modality_logits is not None:
            modality_ce = F.cross_entropy(modality_logits.float(), batch["modality"])
            loss = loss + modality_ce
            losses["modality_ce"] = modality_ce
        state.usage += distributed.all_reduce_sum(codebook.count_usage(quantized.indices.detach(), batch["modality"])).cpu()
        state.step += 1
        if state.step % RESEED_EVERY == 0 and state.step <= reseed_until:
            z, batch_modality = _interleaved(quantized.z.detach().float()), _interleaved(batch["modality"])
            codebook.reseed_dead_codes(z, batch_modality, state.usage, state.generator)
            state.usage.zero_()
        return {"loss": loss, **losses}

    result = run_training(
        name="codebook-pretrain",
        engine=engine,
        make_batches=batches,
        steps_per_epoch=batches.steps_per_epoch,
        step_fn=step,
        config=stage,
        workdir=output,
        tracker=tracker,
        state=state,
    )
    codebook.eval()
    if distributed.is_main():
        save_modules(output, {"codebook": codebook}, taxonomy)
        copy_modules(modules, output, ("perceiver",))

    matcher = HungarianMatcher(config.model.loss)
    def quantize(out, batch):
        return codebook.decode(perceiver, codebook(out.queries, batch["modality"]).quantized, out.pixel_features)

    metrics: dict[str, float] = {"train_steps": float(result.steps)}
    with engine.autocast():
        for name in ("val", "test"):
            continuous = matched_dice(perceiver, splits[name], encoder, matcher, num_workers=stage.num_workers)
            discrete = matched_dice(perceiver, splits[name], encoder, matcher, decode_fn=quantize,
                                    num_workers=stage.num_workers)
            metrics[f"{name}_dice"] = continuous
            metrics[f"{name}_dice_quantized"] = discrete
            metrics[f"{name}_dice_retention"] = discrete / max(continuous, 1e-6)
        used = codes_used_by_regions(perceiver, codebook, splits["test"], encoder, matcher)
        metrics["dice_retention"] = metrics["test_dice_retention"]
        metrics["min_codes_used_per_modality"] = float(min(used.values()))
        metrics.update({f"codes_used_modality_{m}": float(n) for m, n in used.items()})
        if codebook.modality_predictor is not None:
            metrics["test_modality_accuracy"] = modality_accuracy(codebook, splits["test"], encoder)
    return metrics
