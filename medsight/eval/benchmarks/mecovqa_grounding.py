"""MeCoVQA-Grounding (MedPLIB): text-prompted segmentation questions.

Format: LLaVA conversations ``{id, image, conversations: [{from: human, value: "<image>\\n
Please segment the liver ..."}, {from: gpt, value: "... <SEG><mask>masks/x.png</mask>"}]}``;
the mask path sits inside the answer between ``<mask>`` tags (a ``mask``/``mask_files`` key is
accepted too), relative to the image folder. Image names follow SA-Med2D
(``ct_00--AbdomenCT1K--Case_00220--x_0359.png``): the modality is the prefix before ``--``
when the entry has no ``modality`` key.

Some released entries point at masks that do not exist or are unusable (MedPLIB issue #3);
as in the paper (App. E.3) they are skipped, and each one is listed with its reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsight.data.image_io import DataError, image_size, open_image
from medsight.eval.benchmarks.common import (
    BenchmarkData,
    EvalSample,
    SkippedEntry,
    canonical_modality,
    clean_question,
    entry_id,
    first_exchange,
    first_image,
    load_json_entries,
    resolve,
)
from medsight.eval.benchmarks.diagseg import mask_list, remove_inline_masks


def modality_from_sa_med2d_name(image: str) -> str:
    """'ct_00--AbdomenCT1K--Case--x_0359.png' -> 'CT'; names without '--' give 'unknown'."""
    name = Path(image).name
    if "--" not in name:
        return "unknown"
    return canonical_modality(name.split("--")[0])


def mask_problem(mask_path: Path, image_path: Path) -> str | None:
    """Why a ground-truth mask cannot be scored (missing, unreadable, empty, wrong size), or None."""
    if not mask_path.is_file():
        return f"mask file missing: {mask_path}"
    try:
        mask = np.asarray(open_image(mask_path).convert("L"))
        if image_size(image_path) != mask.shape:
            return f"mask {mask_path} is {mask.shape[0]}x{mask.shape[1]}, its image is not"
    except DataError as error:
        return str(error)
    if not mask.any():
        return f"mask is empty: {mask_path}"
    return None


def read_mecovqa_grounding(path: Path, image_root: Path, mask_root: Path | None = None) -> BenchmarkData:
    """``mask_root`` defaults to ``image_root`` (MedPLIB resolves both against one folder)."""
    path = Path(path)
    mask_root = Path(mask_root) if mask_root is not None else Path(image_root)
    samples: list[EvalSample] = []
    skipped: list[SkippedEntry] = []
    for index, entry in enumerate(load_json_entries(path)):
        sample_id = entry_id(entry, index)
        question, answer = first_exchange(entry, path, sample_id)
        answer, inline = remove_inline_masks(answer)
        relative_masks = inline or mask_list(entry, path, sample_id)
        if not relative_masks:
            skipped.append(SkippedEntry(sample_id, "answer names no mask"))
            continue
        image_name = first_image(entry, path, sample_id)
        image_path = resolve(image_root, image_name, f"{path}: entry {sample_id}")
        if not image_path.is_file():
            skipped.append(SkippedEntry(sample_id, f"image file missing: {image_path}"))
            continue
        mask_paths = [resolve(mask_root, mask, f"{path}: entry {sample_id} masks") for mask in relative_masks]
        problems = [p for p in (mask_problem(m, image_path) for m in mask_paths) if p]
        if problems:
            skipped.append(SkippedEntry(sample_id, "; ".join(problems)))
            continue
        modality_name = str(entry.get("modality") or modality_from_sa_med2d_name(image_name))
        samples.append(
            EvalSample(
                benchmark="mecovqa_g",
                sample_id=sample_id,
                task="grounding",
                question=clean_question(question),
                modality=canonical_modality(modality_name),
                image_path=image_path,
                source_modality=modality_name,
                answer=answer,
                mask_paths=mask_paths,
            )
        )
    return BenchmarkData(name="mecovqa_g", source=path, samples=samples, skipped=skipped)
