"""DiagSeg: diagnosis-then-segment questions (paper Sec. 3, App. B).

Format (LLaVA conversation + masks, as the grounding data and the authors' files):
``{id, image, conversations: [human q, gpt a], mask_files: [..] | mask_file, mask_orders?,
diagnosis?, modality}``; paths are relative to the dataset root. The gpt answer names the
finding and carries region tokens; ``mask_files`` are the ground-truth masks in the order the
answer's region tokens refer to them (``mask_orders`` reorders them when given).
Scored by diagnosis recall (LLaVA-Med open recall of the answer text without region tokens)
and Dice of the masks decoded from the region tokens the model generates.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medsight.eval.benchmarks.common import (
    BenchmarkData,
    BenchmarkFormatError,
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

_INLINE_MASK = re.compile(r"<mask>(.*?)</mask>")


def mask_list(entry: dict[str, Any], path: Path, where: str) -> list[str]:
    """The entry's mask paths in answer order, from whichever key the file uses."""
    raw = entry.get("mask_files", entry.get("mask_file", entry.get("masks", entry.get("mask"))))
    if raw is None:
        return []
    masks = [raw] if isinstance(raw, str) else raw
    if not isinstance(masks, list) or not all(isinstance(m, str) for m in masks):
        raise BenchmarkFormatError(f"{path}: entry {where}: mask paths must be a string or a list of strings")
    orders = entry.get("mask_orders")
    if orders is not None:
        if not isinstance(orders, list) or len(orders) != len(masks):
            raise BenchmarkFormatError(f"{path}: entry {where}: mask_orders must list one order per mask file")
        masks = [mask for _, mask in sorted(zip(orders, masks), key=lambda pair: pair[0])]
    return masks


def remove_inline_masks(text: str) -> tuple[str, list[str]]:
    """MedPLIB writes ``<mask>path</mask>`` inside answers: return (text without them, paths)."""
    return _INLINE_MASK.sub("", text).strip(), _INLINE_MASK.findall(text)


def read_diagseg(path: Path, data_root: Path, benchmark: str = "diagseg") -> BenchmarkData:
    path = Path(path)
    samples: list[EvalSample] = []
    skipped: list[SkippedEntry] = []
    for index, entry in enumerate(load_json_entries(path)):
        sample_id = entry_id(entry, index)
        question, answer = first_exchange(entry, path, sample_id)
        answer, inline = remove_inline_masks(answer)
        relative_masks = mask_list(entry, path, sample_id) or inline
        if not relative_masks:
            raise BenchmarkFormatError(f"{path}: entry {sample_id} has no mask_files (DiagSeg needs the masks to score)")
        image_path = resolve(data_root, first_image(entry, path, sample_id), f"{path}: entry {sample_id}")
        mask_paths = [resolve(data_root, mask, f"{path}: entry {sample_id} mask_files") for mask in relative_masks]
        missing = [str(p) for p in [image_path, *mask_paths] if not p.is_file()]
        if missing:
            skipped.append(SkippedEntry(sample_id, f"file missing: {', '.join(missing)}"))
            continue
        modality_name = str(entry.get("modality", "unknown"))
        samples.append(
            EvalSample(
                benchmark=benchmark,
                sample_id=sample_id,
                task="diagseg",
                question=clean_question(question),
                modality=canonical_modality(modality_name),
                image_path=image_path,
                source_modality=modality_name,
                answer=answer,
                mask_paths=mask_paths,
                diagnosis=str(entry.get("diagnosis", "")),
            )
        )
    return BenchmarkData(name=benchmark, source=path, samples=samples, skipped=skipped)
