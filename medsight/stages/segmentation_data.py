"""Segmentation data for stages 1, 2 and the grounding-data build, streamed from disk.

A split is the prepared index's records (file paths and labels, ``read_split``); images and
masks are decoded per sample by DataLoader workers, and the frozen encoder runs on the device
inside the step. Host memory does not grow with the split: the only per-image state kept is
the optional bounded caches (``feature_cache_mb``: decoded files in the dataset, encoder outputs
beside the encoder), which let a small dataset revisited for many epochs (the tiny preset) skip
repeated decoding and encoding. At full scale they are off.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from medsight.data.biomedparse import SegmentationDataset, SegmentationRecord
from medsight.data.errors import DataError
from medsight.data.prepared_index import index_path, read_split
from medsight.data.taxonomy import Taxonomy
from medsight.model.encoder import ImageEncoder
from medsight.model.visual_cache import VisualContextCache
from medsight.train.data import ResumableSampler, ShardSampler, make_loader, to_device

MiB = 1024 * 1024


class SegmentationSamples(Dataset):
    """The reader's records as samples: image [3, S, S], masks [R, S, S], labels [R], modality [],
    key (the image path, what the feature cache is keyed by). Images over ``max_masks`` are
    dropped here ("skip") or refused ("error"), so ``records`` lists exactly the samples."""

    def __init__(self, records: list[SegmentationRecord], image_size: int, max_masks: int, cache_bytes: int = 0,
                 on_too_many: str = "skip"):
        self.samples = SegmentationDataset(records, image_size=image_size, max_masks=max_masks, on_too_many=on_too_many)
        self.cache_bytes = cache_bytes
        self.used_bytes = 0
        self._cached: dict[int, dict] = {}

    @property
    def records(self) -> list[SegmentationRecord]:
        return self.samples.records

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        item = self._cached.get(index)
        if item is None:
            item = {**self.samples[index], "key": str(self.samples.records[index].image_path)}
            size = item["image"].numel() * 4 + item["masks"].numel() * 4
            # Filled first-come and bounded (per worker process): a budget, never a copy of the split.
            if self.used_bytes + size <= self.cache_bytes:
                self._cached[index] = item
                self.used_bytes += size
        return item


def collate(batch: list[dict]) -> dict:
    """Images and modalities stacked; masks and labels stay per-image lists (R varies)."""
    return {
        "images": torch.stack([item["image"] for item in batch]),  # [B, 3, S, S]
        "modality": torch.stack([item["modality"] for item in batch]),  # [B]
        "masks": [item["masks"] for item in batch],  # B x [R_b, S, S]
        "labels": [item["labels"] for item in batch],  # B x [R_b]
        "keys": [item["key"] for item in batch],
    }


def load_split(data_dir: Path, split: str, image_size: int, max_masks: int, taxonomy: Taxonomy,
               cache_mb: int = 0, only: set[str] | None = None, on_too_many: str = "skip") -> SegmentationSamples:
    """A prepared split's records (paths only) wrapped as a dataset; nothing is decoded here.
    ``only``: just these image ids. ``on_too_many`` (``data.too_many_masks``): images over
    ``max_masks`` are skipped, as the authors do, or stop the stage ("error")."""
    records = read_split(Path(data_dir), split, taxonomy, only)
    if not records:
        raise ValueError(f"{index_path(Path(data_dir), split)} has no images; prepare a release with a {split} split")
    if on_too_many == "skip" and all(len(record.regions) > max_masks for record in records):
        # Skipping would leave nothing; say which split and which setting, not just "no image".
        raise DataError(f"{index_path(Path(data_dir), split)}: every image has more than max_masks_per_image="
                        f"{max_masks} masks, so data.too_many_masks=skip leaves none; raise the stage's "
                        "max_masks_per_image")
    return SegmentationSamples(records, image_size, max_masks, cache_mb * MiB, on_too_many)


def train_loader(samples: SegmentationSamples, batch_size: int, seed: int, num_workers: int) -> DataLoader:
    """This rank's shuffled share of each epoch (``ResumableSampler``)."""
    return make_loader(samples, batch_size, ResumableSampler(samples, seed), collate, num_workers)


def eval_loader(samples: SegmentationSamples, batch_size: int, num_workers: int = 0, shard: bool = True) -> DataLoader:
    """In order; with ``shard`` this rank's every W-th sample (results are summed over ranks)."""
    sampler = ShardSampler(len(samples)) if shard else SequentialSampler(samples)
    return make_loader(samples, batch_size, sampler, collate, num_workers)


@dataclass
class Features:
    patch_tokens: torch.Tensor  # [B, P, C]
    cls_tokens: torch.Tensor  # [B, C]


class FrozenEncoder:
    """The frozen image encoder on the rank's device, called inside the step; per-image outputs
    optionally kept in a bounded cache (keyed by image path) across epochs."""

    def __init__(self, encoder: ImageEncoder, device: torch.device, cache_mb: int = 0):
        self.encoder = encoder.to(device)
        self.device = device
        self.cache = VisualContextCache.from_megabytes(cache_mb)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(images)
        return out.patch_tokens, out.cls_token

    @torch.no_grad()
    def __call__(self, batch: dict) -> Features:
        images = batch["images"]
        if self.cache is not None:
            patch, cls = self.cache.lookup(batch["keys"], images, self._encode)
        else:
            patch, cls = self._encode(images)
        return Features(patch, cls)


def iterate(loader: DataLoader, device: torch.device) -> Iterator[dict]:
    """The loader's batches with their tensors on ``device`` (float32: stages 1-2 use autocast
    for bf16)."""
    for batch in loader:
        yield to_device(batch, device)
