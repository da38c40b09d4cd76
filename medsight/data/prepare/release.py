"""Reading a BiomedParse release as published, one sub-dataset at a time.

A release is a folder of sub-datasets (``amos22/CT``, ``BreastUS``...: any folder holding
``train.json`` or ``test.json``), each with ``{split}/IMAGE_MODALITY_SITE.png``,
``{split}_mask/IMAGE_MODALITY_SITE_TARGET.png`` (spaces in TARGET as ``+``) and a COCO-like
``{split}.json``: ``images[] {id, file_name}``, ``annotations[] {image_id, mask_file,
category_id, bbox, sentences: [{sent}]}``, ``categories[] {id, name}``. The annotation files are
streamed (ijson), so memory holds one sub-dataset's entries, never the release. Problems that
need no file access (names, ids) are found here; file checks are ``verify.py``'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ijson

from medsight.data.prepared_index import parse_image_name, target_from_mask_name
from medsight.data.prepare.report import ProblemLog
from medsight.data.taxonomy_template import TaxonomyTemplate

RELEASE_SPLITS = ("train", "test")
_IMAGE_FOLDERS = frozenset(f"{split}{suffix}" for split in RELEASE_SPLITS for suffix in ("", "_mask"))


@dataclass(frozen=True)
class Subset:
    name: str  # path under the release root, posix ("amos22/CT")
    root: Path


@dataclass
class PendingRegion:
    mask_file: str  # as in the JSON, under {split}_mask/
    class_name: str
    sentences: list[str]
    bbox: list[float] | None
    area: float | None  # the annotation's own pixel count, when it gives one


@dataclass
class PendingImage:
    file_name: str
    spelling: str
    site: str
    modality: str
    regions: list[PendingRegion] = field(default_factory=list)


def find_subsets(source: Path, only: tuple[str, ...] = ()) -> list[Subset]:
    """Every sub-dataset folder under ``source`` (sorted), without listing image folders."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: release folder does not exist")
    found: list[Subset] = []
    for directory, subdirs, files in os.walk(source):
        subdirs[:] = sorted(d for d in subdirs if d not in _IMAGE_FOLDERS and not d.startswith("."))
        if any(f"{split}.json" in files for split in RELEASE_SPLITS):
            root = Path(directory)
            found.append(Subset(root.relative_to(source).as_posix() or root.name, root))
    if only:
        missing = sorted(set(only) - {s.name for s in found})
        if missing:
            raise FileNotFoundError(
                f"{source}: no sub-dataset {', '.join(missing)}; found: {', '.join(s.name for s in found) or 'none'}"
            )
        found = [s for s in found if s.name in only]
    if not found:
        raise FileNotFoundError(
            f"{source}: no sub-dataset found (a folder holding train.json or test.json with "
            "train/, train_mask/...); is this a BiomedParse release?"
        )
    return sorted(found, key=lambda s: s.name)


def _stream(path: Path, prefix: str) -> Iterator[Any]:
    with open(path, "rb") as handle:
        yield from ijson.items(handle, prefix, use_float=True)


def _sentences(annotation: dict[str, Any]) -> list[str]:
    out = []
    for sentence in annotation.get("sentences") or []:
        text = sentence.get("sent") if isinstance(sentence, dict) else sentence
        if isinstance(text, str) and text.strip():
            out.append(text.strip())
    return out


def _bbox(annotation: dict[str, Any]) -> list[float] | None:
    box = annotation.get("bbox")
    if isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
        return [float(v) for v in box]
    return None


def read_split(subset: Subset, split: str, template: TaxonomyTemplate, log: ProblemLog) -> tuple[list[PendingImage], int]:
    """(images of one sub-dataset split whose names resolve, images listed); the rest go to ``log``."""
    json_path = subset.root / f"{split}.json"
    where = {"subset": subset.name, "split": split}
    seen = 0
    try:
        categories = {int(c["id"]): str(c["name"]) for c in _stream(json_path, "categories.item")}
        images: dict[Any, PendingImage] = {}
        bad_ids: set[Any] = set()
        for entry in _stream(json_path, "images.item"):
            seen += 1
            image_id, file_name = entry.get("id"), entry.get("file_name")
            if image_id is None or not isinstance(file_name, str):
                log.problem(str(json_path), f"images entry without id/file_name: {entry!r:.120}", "image dropped", "bad entry", **where)
                continue
            image_file = f"{subset.root}/{split}/{file_name}"
            if image_id in images or image_id in bad_ids:
                log.problem(image_file, f"duplicate image id {image_id!r}", "image dropped", "bad entry", **where)
                continue
            try:
                _, spelling, site = parse_image_name(file_name)
            except ValueError as error:
                log.problem(image_file, str(error), "image dropped", "bad name", **where)
                bad_ids.add(image_id)
                continue
            modality = template.find_modality(spelling, site)
            if modality is None:
                log.problem(image_file, f"unknown modality {spelling!r} (site {site!r}): add an alias to the "
                            f"taxonomy ({template.source})", "image dropped", "unknown modality", **where)
                bad_ids.add(image_id)
                continue
            images[image_id] = PendingImage(file_name, spelling, site, modality)
        for annotation in _stream(json_path, "annotations.item"):
            image = images.get(annotation.get("image_id"))
            if image is None:
                if annotation.get("image_id") not in bad_ids:
                    log.problem(str(json_path), f"annotation for unknown image_id {annotation.get('image_id')!r}",
                                "annotation ignored", "bad entry", **where)
                continue
            _add_region(image, annotation, subset, split, categories, template, log, images, bad_ids)
    except (OSError, ijson.JSONError, ValueError, KeyError, TypeError) as error:
        log.problem(str(json_path), f"unreadable annotation file ({error})", "split dropped", "bad annotation file", **where)
        return [], max(seen, 1)
    return list(images.values()), seen


def _add_region(image: PendingImage, annotation: dict[str, Any], subset: Subset, split: str, categories: dict[int, str],
                template: TaxonomyTemplate, log: ProblemLog, images: dict[Any, PendingImage], bad_ids: set[Any]) -> None:
    where = {"subset": subset.name, "split": split}
    mask_file = annotation.get("mask_file")
    if not isinstance(mask_file, str):
        log.problem(f"{subset.root}/{split}/{image.file_name}", "annotation without mask_file", "image dropped", "bad entry", **where)
        _drop(images, bad_ids, annotation.get("image_id"))
        return
    mask_path = f"{subset.root}/{split}_mask/{mask_file}"
    class_name = target_from_mask_name(mask_file, image.file_name)
    if class_name is None:
        class_name = categories.get(annotation.get("category_id"))
        if class_name is None:
            log.problem(mask_path, f"unknown category_id {annotation.get('category_id')!r}", "image dropped", "unknown class", **where)
            _drop(images, bad_ids, annotation.get("image_id"))
            return
    if not template.knows_class(class_name):
        log.problem(mask_path, f"unknown region class {class_name!r} (not in {template.source})", "image dropped",
                    "unknown class", **where)
        _drop(images, bad_ids, annotation.get("image_id"))
        return
    area = annotation.get("area")
    image.regions.append(PendingRegion(mask_file, class_name, _sentences(annotation), _bbox(annotation),
                                       float(area) if isinstance(area, (int, float)) and area > 0 else None))


def _drop(images: dict[Any, PendingImage], bad_ids: set[Any], image_id: Any) -> None:
    images.pop(image_id, None)
    bad_ids.add(image_id)
