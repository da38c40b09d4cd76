"""Torch Dataset over the prepared BiomedParse index (``prepared_index.py``).

The index is what ``medsight data prepare biomedparse`` writes from a release as published; the
records, the name parsing and the index reader live in ``prepared_index`` (torch-free, so the
data CLI starts fast) and are re-exported here.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import Dataset

from medsight.data.image_io import image_size, load_image, load_mask
from medsight.data.prepared_index import (  # noqa: F401  (re-exported)
    RegionRecord,
    SegmentationRecord,
    iter_split,
    parse_image_name,
    read_split,
    target_from_mask_name,
)
from medsight.data.errors import DataError


class SegmentationDataset(Dataset):
    """Images with all their region masks, resized to ``image_size`` (square).

    Images with more than ``max_masks`` regions are dropped with one warning ("skip", the
    authors' behaviour; prepare already skips and reports them) or refused ("error"), never
    silently truncated.
    """

    def __init__(self, records: list[SegmentationRecord], image_size: int, max_masks: int = 16,
                 on_too_many: str = "skip") -> None:
        if on_too_many not in ("error", "skip"):
            raise ValueError(f"on_too_many must be 'error' or 'skip', got {on_too_many!r}")
        self.image_size = image_size
        self.records: list[SegmentationRecord] = []
        skipped: list[str] = []
        for record in records:
            if len(record.regions) <= max_masks:
                self.records.append(record)
            elif on_too_many == "skip":
                skipped.append(record.image_id)
            else:
                raise DataError(f"{record.image_path}: {len(record.regions)} masks, more than the stage's "
                                f"max_masks_per_image={max_masks}; raise that, or drop such images "
                                "with --set data.too_many_masks=skip")
        if skipped:
            warnings.warn(f"skipped {len(skipped)} image(s) with more than {max_masks} masks: "
                          f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
                          stacklevel=2)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        size = self.image_size
        original_hw = image_size(record.image_path)
        image = load_image(record.image_path, size)  # [3,S,S] in [0,1]
        masks = [load_mask(r.mask_path, size, expected_hw=original_hw) for r in record.regions]
        return {
            "image": image,
            "masks": torch.stack(masks).float() if masks else torch.zeros(0, size, size),  # [R,S,S]
            "labels": torch.tensor([r.class_id for r in record.regions], dtype=torch.long),  # [R]
            "modality": torch.tensor(record.modality_id, dtype=torch.long),  # []
            "image_id": record.image_id,
        }


def collate_segmentation(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and modalities; masks and labels stay per-image lists (R varies)."""
    return {
        "images": torch.stack([item["image"] for item in batch]),  # [B,3,S,S]
        "modality": torch.stack([item["modality"] for item in batch]),  # [B]
        "masks": [item["masks"] for item in batch],  # B x [R_b,S,S]
        "labels": [item["labels"] for item in batch],  # B x [R_b]
        "image_ids": [item["image_id"] for item in batch],
    }
