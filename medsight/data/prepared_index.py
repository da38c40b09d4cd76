"""The prepared BiomedParse index: what stages 1, 2 and grounding-data read (torch-free).

``medsight data prepare biomedparse`` writes ``<root>/biomedparse/{train,val,test}.jsonl``, one
image per line; images are never copied, every path is relative to the dataset root::

    {"id": "amos_0353_190_CT_abdomen", "subset": "amos22/CT", "image": "../BiomedParse/amos22/CT/train/...png",
     "modality": "CT-Abdomen", "spelling": "CT", "site": "abdomen", "height": 1024, "width": 1024,
     "regions": [{"mask": "...", "class": "liver", "sentences": ["liver in abdomen CT"], "bbox": [x, y, w, h],
                  "area": 0.071}]}

Lines are read one at a time, so a million-image split is never parsed as one document.
Names: image files ``IMAGE_MODALITY_SITE.png``, masks ``IMAGE_MODALITY_SITE_TARGET.png``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsight.data.errors import DataError
from medsight.data.safe_paths import prepared_roots, resolve_under
from medsight.data.taxonomy import Taxonomy

INDEX_DIR = "biomedparse"
SPLITS = ("train", "val", "test")


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
    modality: str  # the taxonomy's name (file-name spellings are mapped at prepare time)
    modality_id: int  # index into Taxonomy.modalities
    regions: list[RegionRecord]


def _stem(file_name: str) -> str:
    """Path(name).stem without building a Path (called for every file of a release)."""
    name = file_name.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def parse_image_name(file_name: str) -> tuple[str, str, str]:
    """'NAME_MODALITY_SITE.png' -> (name, modality, site); NAME may itself hold underscores."""
    parts = _stem(file_name).rsplit("_", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"image name {file_name!r} is not IMAGE_MODALITY_SITE.png")
    return parts[0], parts[1], parts[2]


def target_from_mask_name(mask_file: str, image_file: str) -> str | None:
    """'STEM_TARGET.png' -> 'target with spaces', or None when the mask is not named after
    its image (the JSON category then decides)."""
    image_stem, mask_stem = _stem(image_file), _stem(mask_file)
    prefix = f"{image_stem}_"
    if not mask_stem.startswith(prefix) or len(mask_stem) == len(prefix):
        return None
    return mask_stem[len(prefix):].replace("+", " ")


def index_path(data_root: Path, split: str) -> Path:
    return Path(data_root) / INDEX_DIR / f"{split}.jsonl"


def iter_index(data_root: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, raw entry) per line of a split's index; a clear error when it was never prepared."""
    path = index_path(data_root, split)
    if not path.is_file():
        raise DataError(
            f"{path}: prepared index does not exist; index a BiomedParse release first with "
            f"`medsight data prepare biomedparse SRC {data_root}`"
        )
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(entry, dict):
                raise DataError(f"{path}:{number}: expected a JSON object (one image per line), "
                                f"got {type(entry).__name__}")
            yield f"{path}:{number}", entry


def record_from_entry(
    entry: dict[str, Any], data_root: Path, taxonomy: Taxonomy, where: str, roots: tuple[Path, ...] = ()
) -> SegmentationRecord:
    """``roots``: the release folders the index may point into (``safe_paths.prepared_roots``)."""
    try:
        modality = taxonomy.find_modality(_text(entry, "modality", where))
        if modality is None:
            taxonomy.modality_index(entry["modality"], where)  # raises naming the known modalities
        if not isinstance(entry["regions"], list):
            raise DataError(f"{where}: regions: expected a list, got {type(entry['regions']).__name__}")
        regions = []
        for number, region in enumerate(entry["regions"]):
            if not isinstance(region, dict):
                raise DataError(f"{where}: regions[{number}]: expected an object, got {type(region).__name__}")
            class_name = _text(region, "class", f"{where}: regions[{number}]")
            box = region.get("bbox")
            sentences = region.get("sentences") or [""]
            regions.append(RegionRecord(
                resolve_under(data_root, _text(region, "mask", f"{where}: regions[{number}]"),
                              f"{where}: regions.mask", roots), class_name,
                taxonomy.class_index(class_name, where), sentences[0], tuple(box) if box else None,
            ))
        return SegmentationRecord(resolve_under(data_root, _text(entry, "image", where), f"{where}: image", roots),
                                  str(entry["id"]), modality, taxonomy.modalities.index(modality), regions)
    except KeyError as error:
        raise DataError(f"{where}: index entry without key {error}") from None
    except TypeError as error:  # e.g. a bbox that is a number: the line has the wrong shape
        raise DataError(f"{where}: index entry of the wrong shape ({error})") from None
    except ValueError as error:
        raise DataError(str(error)) from None


def _text(entry: dict[str, Any], key: str, where: str) -> str:
    """``entry[key]``, which must be a string (a list or number would become a nonsense path)."""
    value = entry[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key}: expected a string, got {type(value).__name__}")
    return value


def iter_split(data_root: Path, split: str, taxonomy: Taxonomy) -> Iterator[SegmentationRecord]:
    roots = prepared_roots(data_root)
    for where, entry in iter_index(data_root, split):
        yield record_from_entry(entry, data_root, taxonomy, where, roots)


def read_split(data_root: Path, split: str, taxonomy: Taxonomy, only: set[str] | None = None) -> list[SegmentationRecord]:
    """The records of a split (``only``: keep just these image ids)."""
    roots = prepared_roots(data_root)
    return [
        record_from_entry(entry, data_root, taxonomy, where, roots)
        for where, entry in iter_index(data_root, split)
        if only is None or str(entry.get("id")) in only
    ]
