"""Segmentation splits held in memory for stages 1, 2 and the grounding-data build.

The encoder is frozen, so its patch tokens are computed once per split instead of every epoch;
on the tiny preset this is most of the speed-up that keeps the chain within minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medsight.data.biomedparse import SegmentationDataset, SegmentationRecord
from medsight.data.errors import DataError
from medsight.data.prepared_index import index_path, read_split
from medsight.data.taxonomy import Taxonomy
from medsight.model.encoder import ImageEncoder


@dataclass
class SegmentationSplit:
    records: list[SegmentationRecord]
    images: torch.Tensor  # [N, 3, S, S] in [0, 1]
    masks: list[torch.Tensor]  # per image [R, S, S] float
    labels: list[torch.Tensor]  # per image [R]
    modality: torch.Tensor  # [N]
    patch_tokens: torch.Tensor | None = None  # [N, P, C] once encoded
    cls_tokens: torch.Tensor | None = None  # [N, C]

    def __len__(self) -> int:
        return self.images.shape[0]


def load_split(data_dir: Path, split: str, image_size: int, max_masks: int, taxonomy: Taxonomy,
               only: set[str] | None = None, on_too_many: str = "skip") -> SegmentationSplit:
    """A prepared split (``only``: just these image ids). ``on_too_many`` (``data.too_many_masks``):
    images over ``max_masks`` are skipped, as the authors do, or stop the stage ("error")."""
    records = read_split(Path(data_dir), split, taxonomy, only)
    if not records:
        raise ValueError(f"{index_path(Path(data_dir), split)} has no images; prepare a release with a {split} split")
    if on_too_many == "skip" and all(len(record.regions) > max_masks for record in records):
        # Skipping would leave nothing; say which split and which setting, not just "no image".
        raise DataError(f"{index_path(Path(data_dir), split)}: every image has more than max_masks_per_image="
                        f"{max_masks} masks, so data.too_many_masks=skip leaves none; raise the stage's "
                        "max_masks_per_image")
    return split_from_records(records, image_size, max_masks, split, on_too_many)


def split_from_records(records: list[SegmentationRecord], image_size: int, max_masks: int,
                       name: str = "split", on_too_many: str = "skip") -> SegmentationSplit:
    dataset = SegmentationDataset(records, image_size=image_size, max_masks=max_masks, on_too_many=on_too_many)
    items = [dataset[i] for i in tqdm(range(len(dataset)), desc=f"load {name}", unit="img", leave=False)]
    if not items:
        raise ValueError(f"{name}: no image with at most {max_masks} masks")
    return SegmentationSplit(
        records=list(dataset.records),
        images=torch.stack([item["image"] for item in items]),
        masks=[item["masks"].float() for item in items],
        labels=[item["labels"] for item in items],
        modality=torch.stack([torch.as_tensor(item["modality"]) for item in items]),
    )


@torch.no_grad()
def encode_split(split: SegmentationSplit, encoder: ImageEncoder, batch_size: int = 64) -> None:
    patches, cls = [], []
    for start in range(0, len(split), batch_size):
        out = encoder(split.images[start : start + batch_size])
        patches.append(out.patch_tokens)
        cls.append(out.cls_token)
    split.patch_tokens = torch.cat(patches)
    split.cls_tokens = torch.cat(cls)


def iterate_batches(split: SegmentationSplit, order: list[int], batch_size: int) -> Iterator[dict]:
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield {
            "patch_tokens": split.patch_tokens[index],
            "cls_tokens": split.cls_tokens[index],
            "masks": [split.masks[i] for i in index],
            "labels": [split.labels[i] for i in index],
            "modality": split.modality[index],
        }
