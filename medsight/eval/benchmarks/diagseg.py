"""DiagSeg: diagnosis-then-segment questions (paper Sec. 3, App. B).

Format (LLaVA conversation + masks, as the grounding data and the authors' files):
``{id, image, conversations: [human q, gpt a], mask_files: [..] | mask_file, mask_orders?,
diagnosis?, modality}``; paths are relative to the dataset root. The gpt answer names the
finding and carries region tokens; ``mask_files`` are the ground-truth masks in the order the
answer's region tokens refer to them (``mask_orders`` reorders them when given).
The authors' released DiagSeg (1,655 questions, 8 modalities) is a JSON list of ``{qa_id,
question, answer ("... segment the lesion as <mask>."), short_answer ("Benign tumor"),
image_file, mask_ids: [id | [ids]], masks: [[id, path], ...], answer_type, modality ("US")}``
with absolute paths into the authors' BiomedParse copy: each path is rebased onto ``data_root``
(``strip_prefix`` removed, or else the longest tail of the path that exists under ``data_root``).
A ``mask_ids`` item that is a list is one region made of several masks (their union).
Scored by diagnosis recall (LLaVA-Med open recall of ``short_answer``, or of the answer text
without region tokens) and Dice of the masks decoded from the region tokens the model generates.
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
    require,
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


def rebase(raw: str, data_root: Path, strip_prefix: str = "") -> Path:
    """A released (often absolute, foreign) path -> the file under ``data_root``."""
    if strip_prefix and raw.startswith(strip_prefix):
        return Path(data_root) / raw[len(strip_prefix):].lstrip("/")
    candidate = Path(raw)
    if not candidate.is_absolute():
        return Path(data_root) / candidate
    if candidate.is_file():
        return candidate
    parts = candidate.parts[1:]
    for start in range(len(parts)):
        tail = Path(data_root).joinpath(*parts[start:])
        if tail.is_file():
            return tail
    return Path(data_root).joinpath(*parts[-3:]) if len(parts) >= 3 else Path(data_root) / candidate.name


def _authors_entry(entry: dict[str, Any], path: Path, where: str, data_root: Path, strip_prefix: str,
                   benchmark: str) -> EvalSample | SkippedEntry:
    """One entry of the authors' released file (see the module docstring)."""
    for key in ("question", "image_file", "mask_ids", "masks"):
        require(entry, key, path, where)
    try:
        files = {str(mask_id): str(file) for mask_id, file in entry["masks"]}
    except (TypeError, ValueError):
        raise BenchmarkFormatError(f"{path}: entry {where}: 'masks' must be a list of [id, path] pairs") from None
    groups, relative = [], []
    for item in entry["mask_ids"]:
        ids = item if isinstance(item, list) else [item]
        unknown = [i for i in ids if str(i) not in files]
        if unknown:
            raise BenchmarkFormatError(f"{path}: entry {where}: mask_ids {unknown} not listed in 'masks'")
        groups.append(len(ids))
        relative += [files[str(i)] for i in ids]
    if not relative:
        raise BenchmarkFormatError(f"{path}: entry {where} has no mask_ids (DiagSeg needs the masks to score)")
    image_path = rebase(str(entry["image_file"]), data_root, strip_prefix)
    mask_paths = [rebase(mask, data_root, strip_prefix) for mask in relative]
    missing = [str(p) for p in [image_path, *mask_paths] if not p.is_file()]
    if missing:
        return SkippedEntry(where, f"file missing: {', '.join(missing)}")
    short = str(entry.get("short_answer") or "").strip()
    answer = short or str(entry.get("answer", "")).replace("<mask>", "").strip()
    modality_name = str(entry.get("modality", "unknown"))
    return EvalSample(
        benchmark=benchmark, sample_id=where, task="diagseg", question=clean_question(str(entry["question"])),
        modality=canonical_modality(modality_name), image_path=image_path, source_modality=modality_name,
        answer=answer, mask_paths=mask_paths, diagnosis=short, mask_groups=groups if any(g > 1 for g in groups) else [],
    )


def read_diagseg(path: Path, data_root: Path, benchmark: str = "diagseg", strip_prefix: str = "") -> BenchmarkData:
    path = Path(path)
    samples: list[EvalSample] = []
    skipped: list[SkippedEntry] = []
    for index, entry in enumerate(load_json_entries(path)):
        sample_id = entry_id(entry, index, "qa_id")
        if "mask_ids" in entry and "masks" in entry:  # the authors' release
            result = _authors_entry(entry, path, sample_id, Path(data_root), strip_prefix, benchmark)
            (samples if isinstance(result, EvalSample) else skipped).append(result)
            continue
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
