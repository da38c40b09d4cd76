"""Reader and torch Dataset for the BiomedParse segmentation layout (real or synthetic).

Layout: ``{split}/IMAGE_MODALITY_SITE.png``, ``{split}_mask/IMAGE_MODALITY_SITE_TARGET.png``
(spaces in TARGET written as ``+``) and a COCO-like ``{split}.json``. The modality comes from
the image file name and the class from the mask file name, as the real dataset encodes them;
the JSON category is the fallback for masks not named after their image. Which names exist is
the dataset's ``Taxonomy`` (its ``taxonomy.json``); names outside it are refused, naming the file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from medsight.data.image_io import DataError, image_size, load_image, load_mask
from medsight.data.safe_paths import resolve_under
from medsight.data.taxonomy import Taxonomy
from medsight.io_utils import missing_reason, read_json


@dataclass(frozen=True)
class RegionRecord:
    mask_path: Path
    class_name: str
    class_id: int  # index into Taxonomy.region_classes
    sentence: str  # first referring sentence ("" when the annotation has none)
    bbox: tuple[float, float, float, float] | None  # x, y, w, h in original pixels


@dataclass(frozen=True)
class SegmentationRecord:
    image_path: Path
    image_id: str  # file stem, e.g. "00042_CT_abdomen"
    modality: str
    modality_id: int  # index into Taxonomy.modalities
    regions: list[RegionRecord]


def parse_image_name(file_name: str) -> tuple[str, str, str]:
    """'NAME_MODALITY_SITE.png' -> (name, modality, site); NAME may itself hold underscores."""
    parts = Path(file_name).stem.rsplit("_", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"image name {file_name!r} is not IMAGE_MODALITY_SITE.png")
    return parts[0], parts[1], parts[2]


def target_from_mask_name(mask_file: str, image_file: str) -> str | None:
    """'STEM_TARGET.png' -> 'target with spaces', or None when the mask is not named after
    its image (the JSON category then decides)."""
    image_stem, mask_stem = Path(image_file).stem, Path(mask_file).stem
    prefix = f"{image_stem}_"
    if not mask_stem.startswith(prefix) or len(mask_stem) == len(prefix):
        return None
    return mask_stem[len(prefix):].replace("+", " ")


def _require(entry: Any, key: str, where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where}: missing key {key!r}")
    return entry[key]


def _load_json(json_path: Path) -> dict[str, Any]:
    data = read_json(json_path, DataError, "annotation file does not exist")
    if not isinstance(data, dict):
        raise DataError(f"{json_path}: expected a JSON object with images and annotations")
    return data


def _first_sentence(annotation: dict[str, Any]) -> str:
    sentences = annotation.get("sentences") or []
    first = sentences[0] if isinstance(sentences, list) and sentences else None
    if isinstance(first, dict):
        return str(first.get("sent", ""))
    return first if isinstance(first, str) else ""


def _bbox(annotation: dict[str, Any]) -> tuple[float, float, float, float] | None:
    box = annotation.get("bbox")
    if isinstance(box, (list, tuple)) and len(box) == 4:
        x, y, w, h = (float(v) for v in box)
        return (x, y, w, h)
    return None


def _categories(data: dict[str, Any], json_path: Path) -> dict[int, str]:
    names: dict[int, str] = {}
    for i, category in enumerate(data.get("categories", [])):
        where = f"{json_path}: categories[{i}]"
        names[int(_require(category, "id", where))] = str(_require(category, "name", where))
    return names


def _region(annotation: dict[str, Any], where: str, image_file: str, mask_dir: Path,
            categories: dict[int, str], taxonomy: Taxonomy) -> RegionRecord:
    """``where`` is 'JSON: annotations[i]'; every error below starts with it."""
    mask_file = str(_require(annotation, "mask_file", where))
    mask_path = resolve_under(mask_dir, mask_file, f"{where}.mask_file")
    if not mask_path.is_file():
        raise DataError(f"{where}: referenced mask file {missing_reason(mask_path)}: {mask_path}")
    class_name = target_from_mask_name(mask_file, image_file)
    if class_name is None:
        category_id = _require(annotation, "category_id", where)
        if category_id not in categories:
            raise DataError(f"{where} ({mask_file}): unknown category_id {category_id}")
        class_name = categories[category_id]
    try:
        class_id = taxonomy.class_index(class_name, where=f"{where} ({mask_file})")
    except ValueError as error:
        raise DataError(str(error)) from None
    return RegionRecord(mask_path, class_name, class_id, _first_sentence(annotation),
                        _bbox(annotation))


def _modality_of(file_name: str, json_path: Path, taxonomy: Taxonomy) -> tuple[str, int]:
    try:
        _, modality, _ = parse_image_name(file_name)
        return modality, taxonomy.modality_index(modality)
    except ValueError as error:
        raise DataError(f"{json_path} ({file_name}): {error}") from None


def read_biomedparse(root: Path, split: str, taxonomy: Taxonomy) -> list[SegmentationRecord]:
    """Records of ``root/{split}.json`` in image order; every referenced file must exist."""
    root = Path(root)
    json_path = root / f"{split}.json"
    data = _load_json(json_path)
    image_dir, mask_dir = root / split, root / f"{split}_mask"
    categories = _categories(data, json_path)
    files: dict[Any, str] = {}  # JSON image id -> file name, in JSON order
    modalities: dict[Any, tuple[str, int]] = {}
    for i, image in enumerate(_require(data, "images", str(json_path))):
        where = f"{json_path}: images[{i}]"
        image_id, file_name = _require(image, "id", where), str(_require(image, "file_name", where))
        if image_id in files:
            raise DataError(f"{where}: duplicate image id {image_id!r}")
        image_path = resolve_under(image_dir, file_name, f"{where}.file_name")
        if not image_path.is_file():
            raise DataError(f"{where}: referenced image file {missing_reason(image_path)}: {image_path}")
        files[image_id] = file_name
        # Before the masks: an unlisted modality is the root problem, not its class names.
        modalities[image_id] = _modality_of(file_name, json_path, taxonomy)
    regions: dict[Any, list[RegionRecord]] = {image_id: [] for image_id in files}
    for i, annotation in enumerate(_require(data, "annotations", str(json_path))):
        where = f"{json_path}: annotations[{i}]"
        image_id = _require(annotation, "image_id", where)
        if image_id not in files:
            raise DataError(f"{where}: unknown image_id {image_id!r}")
        regions[image_id].append(_region(annotation, where, files[image_id], mask_dir, categories,
                                       taxonomy))
    records = []
    for image_id, file_name in files.items():
        modality, modality_id = modalities[image_id]
        records.append(SegmentationRecord(image_dir / file_name, Path(file_name).stem, modality,
                                          modality_id, regions[image_id]))
    return records


class SegmentationDataset(Dataset):
    """Images with all their region masks, resized to ``image_size`` (square).

    Images with more than ``max_masks`` regions are refused at construction ("error") or
    dropped with one warning ("skip", the authors' behaviour), never silently truncated.
    """

    def __init__(self, records: list[SegmentationRecord], image_size: int, max_masks: int = 16,
                 on_too_many: str = "error") -> None:
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
