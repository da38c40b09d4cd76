"""Example cases for the report: overlay PNGs on disk plus ``examples.json`` describing them.

Writing them next to ``results.json`` lets the report be rebuilt later (``medsight eval
report``) and lets MLflow keep the overlays as artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medsight.eval.metrics import Box, box_from_mask, resize_probabilities
from medsight.eval.runner import BenchmarkResult
from medsight.eval.visuals import GT_COLOR, PALETTE, mask_to_pil, overlay, png_bytes
from medsight.io_utils import atomic_path, atomic_write_json, safe_name

EXAMPLES_FILE = "examples.json"


def _safe(name: str) -> str:
    return safe_name(name, fallback="sample")


def benchmark_folders(names: list[str]) -> dict[str, str]:
    """Benchmark name (from a manifest or a dataset file) -> one safe folder name each.

    A name like ``../../x`` must never become a path; two names that sanitise alike get
    numbered folders instead of overwriting each other's overlays.
    """
    folders: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = safe_name(name, fallback="benchmark")
        folder, count = base, 1
        while folder in used:
            count += 1
            folder = f"{base}-{count}"
        used.add(folder)
        folders[name] = folder
    return folders


def _write_png(path: Path, picture) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(picture))


def write_examples(results: list[BenchmarkResult], output: Path) -> list[dict[str, Any]]:
    """Overlays under ``output/overlays/<benchmark>/`` and their index in ``examples.json``."""
    output = Path(output)
    records: list[dict[str, Any]] = []
    folders = benchmark_folders([result.name for result in results])
    for result in results:
        for item in result.results:
            if item.example is None:
                continue
            sample, example = item.sample, item.example
            folder = output / "overlays" / folders[result.name]
            stem = _safe(sample.sample_id)
            gt_boxes = list(sample.boxes) or [b for b in (box_from_mask(m) for m in example.gt_masks) if b]
            pictures = {
                "image": overlay(example.image, []),
                "gt": overlay(example.image, [(m, GT_COLOR) for m in example.gt_masks], [(b, GT_COLOR) for b in gt_boxes]),
                "pred": overlay(
                    example.image,
                    [(m, PALETTE[i % len(PALETTE)]) for i, m in enumerate(example.pred_masks)],
                    [(b, PALETTE[i % len(PALETTE)]) for i, b in enumerate(item.pred_boxes)],
                ),
            }
            files = {}
            for kind, picture in pictures.items():
                path = folder / f"{stem}_{kind}.png"
                _write_png(path, picture)
                files[kind] = str(path.relative_to(output))
            records.append(
                {
                    "benchmark": result.name,
                    "id": sample.sample_id,
                    "modality": sample.modality,
                    "task": sample.task,
                    "question": sample.question,
                    "options": sample.options,
                    "ground_truth": sample.answer,
                    "prediction": item.prediction,
                    "region_tokens": item.region_tokens,
                    "token_colors": ["#%02x%02x%02x" % PALETTE[i % len(PALETTE)] for i in range(len(item.region_tokens))],
                    "gt_boxes": [list(b) for b in gt_boxes],
                    "pred_boxes": [list(b) for b in item.pred_boxes],
                    "scores": item.scores,
                    "files": files,
                }
            )
    atomic_write_json(output / EXAMPLES_FILE, records)
    return records


def write_prediction_files(
    output: Path, image: torch.Tensor, tokens: list[str], masks: torch.Tensor, boxes: list[Box | None], stem: str = "region"
) -> list[dict[str, Any]]:
    """``medsight predict`` outputs: per region token one mask PNG and one overlay PNG.

    image [3, H, W]; masks [K, h, w] probabilities at any resolution (the model's): each is
    resized to H x W only while it is written, so memory holds one full-size mask at a time.
    """
    output = Path(output)
    entries = []
    size = tuple(image.shape[-2:])
    for index, (token, small) in enumerate(zip(tokens, masks)):
        mask = resize_probabilities(small[None], size)[0]  # [H, W]
        color = PALETTE[index % len(PALETTE)]
        name = f"{stem}{index:02d}_{_safe(token.strip('[]'))}"
        mask_path, overlay_path = output / f"{name}_mask.png", output / f"{name}_overlay.png"
        _write_png(mask_path, mask_to_pil(mask))
        box = boxes[index] if index < len(boxes) else None
        _write_png(overlay_path, overlay(image, [(mask, color)], [(box, color)] if box else [], min_size=0))
        entries.append({"token": token, "mask": mask_path.name, "overlay": overlay_path.name, "box_xyxy_normalized": list(box) if box else None})
    return entries
