"""Bounding-box grounding (paper App. F.5): S-Chain and MedTrinity-style box annotations.

The model predicts masks; its boxes are the masks' extents, scored by IoU against ground-truth
boxes (mIoU, the S-Chain protocol).

- S-Chain (Hugging Face parquet, e.g. ``English/test-*.parquet``): an ``image`` struct
  (``{bytes, path}``) and a string column ``Bbox coordinates normalized (X, Y, W, H)`` holding
  one or more boxes; X, Y is the top-left corner (``box_origin="center"`` reads YOLO-style
  centres). Values in [0, 1] are fractions; a file whose values exceed 1 is read as percent.
- MedTrinity-style JSON/JSONL records: ``{id, image, question|caption?, bbox|boxes: [x1, y1,
  x2, y2] | [[...], ...], box_format?: xyxy|xywh, normalized?: bool, modality?}``; pixel boxes
  are normalised with the image size read from the image header.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medsight.data.image_io import DataError, image_size
from medsight.eval.benchmarks.common import (
    Box,
    BenchmarkData,
    BenchmarkFormatError,
    EvalSample,
    SkippedEntry,
    canonical_modality,
    entry_id,
    first_image,
    load_json_entries,
    resolve,
)

SCHAIN_BOX_COLUMN = "Bbox coordinates normalized (X, Y, W, H)"
SCHAIN_MODALITY_COLUMN = "Modality"  # optional: absent from the released (all-MRI) set
DEFAULT_BOX_PROMPT = "Please locate the abnormal region in this image and segment it."
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE]-?\d+)?")


def parse_box_numbers(raw: Any, where: str) -> list[list[float]]:
    """Boxes as lists of 4 numbers from a nested list or a string such as "[[0.1, 0.2, ...]]"."""
    if isinstance(raw, str):
        numbers = [float(n) for n in _NUMBER.findall(raw)]
    elif isinstance(raw, (list, tuple)):
        flat: list[Any] = []
        stack = list(raw)[::-1]
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(list(item)[::-1])
            else:
                flat.append(item)
        try:
            numbers = [float(n) for n in flat]
        except (TypeError, ValueError) as error:
            raise BenchmarkFormatError(f"{where}: box values must be numbers ({raw!r})") from error
    else:
        raise BenchmarkFormatError(f"{where}: boxes must be a list or a string, got {type(raw).__name__}")
    if not numbers or len(numbers) % 4:
        raise BenchmarkFormatError(f"{where}: expected groups of 4 box numbers, got {len(numbers)} ({raw!r})")
    return [numbers[i : i + 4] for i in range(0, len(numbers), 4)]


def to_xyxy(values: list[float], box_format: str, origin: str = "top-left") -> Box:
    a, b, c, d = values
    if box_format == "xyxy":
        return (min(a, c), min(b, d), max(a, c), max(b, d))
    if box_format != "xywh":
        raise ValueError(f"box_format must be xyxy or xywh, not {box_format!r}")
    if origin == "center":
        a, b = a - c / 2, b - d / 2
    return (a, b, a + c, b + d)


def _clip(box: Box) -> Box:
    return tuple(min(1.0, max(0.0, v)) for v in box)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- S-Chain


def read_schain(path: Path, question: str = DEFAULT_BOX_PROMPT, box_origin: str = "top-left") -> BenchmarkData:
    """S-Chain parquet file(s) (a file or a directory of them); images are embedded bytes."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise BenchmarkFormatError(f"{path}: no S-Chain parquet files found")
    samples: list[EvalSample] = []
    skipped: list[SkippedEntry] = []
    for file in files:
        try:
            rows = pq.read_table(file).to_pylist()
        except Exception as error:  # pyarrow raises several unrelated types for bad files
            raise BenchmarkFormatError(f"{file}: cannot read parquet ({error})") from error
        parsed: list[tuple[str, dict[str, Any], list[list[float]]]] = []
        for index, row in enumerate(rows):
            sample_id = str(row.get("Patient ID") or index) + f"/{row.get('Slide', index)}"
            if SCHAIN_BOX_COLUMN not in row:
                raise BenchmarkFormatError(f"{file}: row {index} has no {SCHAIN_BOX_COLUMN!r} column")
            raw = row[SCHAIN_BOX_COLUMN]
            if raw in (None, "", "[]"):
                skipped.append(SkippedEntry(sample_id, "no bounding box"))
                continue
            parsed.append((sample_id, row, parse_box_numbers(raw, f"{file} row {index}")))
        # Percent or fraction is a property of the file, not of one small box.
        scale = 100.0 if any(v > 1.0 for _, _, boxes in parsed for box in boxes for v in box) else 1.0
        for sample_id, row, boxes in parsed:
            image = row.get("image")
            if not isinstance(image, dict) or not image.get("bytes"):
                skipped.append(SkippedEntry(sample_id, "no embedded image"))
                continue
            samples.append(
                EvalSample(
                    benchmark="schain",
                    sample_id=sample_id,
                    task="box",
                    question=question,
                    # The released S-Chain is OASIS brain MRI and has no modality column; a file
                    # that carries one (other sources, the synthetic set) is labelled from it.
                    modality=canonical_modality(str(row.get(SCHAIN_MODALITY_COLUMN) or "MRI")),
                    image_bytes=bytes(image["bytes"]),
                    source_modality=str(row.get(SCHAIN_MODALITY_COLUMN) or "MRI"),
                    boxes=[_clip(to_xyxy([v / scale for v in box], "xywh", box_origin)) for box in boxes],
                )
            )
    return BenchmarkData(name="schain", source=path, samples=samples, skipped=skipped)


# ---------------------------------------------------------------------------- JSON boxes


def read_box_json(
    path: Path,
    image_root: Path,
    benchmark: str = "medtrinity",
    box_format: str = "xyxy",
    question: str = DEFAULT_BOX_PROMPT,
) -> BenchmarkData:
    path = Path(path)
    samples: list[EvalSample] = []
    skipped: list[SkippedEntry] = []
    for index, entry in enumerate(load_json_entries(path)):
        sample_id = entry_id(entry, index)
        raw = entry.get("boxes", entry.get("bbox", entry.get("bboxes")))
        if raw is None:
            raise BenchmarkFormatError(f"{path}: entry {sample_id} has no 'bbox'/'boxes' key")
        boxes = parse_box_numbers(raw, f"{path}: entry {sample_id}")
        image_path = resolve(image_root, first_image(entry, path, sample_id), f"{path}: entry {sample_id}")
        if not image_path.is_file():
            skipped.append(SkippedEntry(sample_id, f"image file missing: {image_path}"))
            continue
        fmt = str(entry.get("box_format", box_format))
        normalized = entry.get("normalized")
        if normalized is None:
            normalized = all(v <= 1.0 for box in boxes for v in box)
        if normalized:
            scale_w = scale_h = 1.0
        else:
            try:
                height, width = image_size(image_path)
            except DataError as error:
                skipped.append(SkippedEntry(sample_id, str(error)))
                continue
            scale_w, scale_h = float(width), float(height)
        xyxy = []
        for box in boxes:
            x1, y1, x2, y2 = to_xyxy(box, fmt)
            xyxy.append(_clip((x1 / scale_w, y1 / scale_h, x2 / scale_w, y2 / scale_h)))
        modality_name = str(entry.get("modality", "unknown"))
        prompt = entry.get("question")
        samples.append(
            EvalSample(
                benchmark=benchmark,
                sample_id=sample_id,
                task="box",
                question=str(prompt) if prompt else question,
                modality=canonical_modality(modality_name),
                image_path=image_path,
                source_modality=modality_name,
                boxes=xyxy,
            )
        )
    return BenchmarkData(name=benchmark, source=path, samples=samples, skipped=skipped)
