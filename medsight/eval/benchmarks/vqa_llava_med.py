"""VQA-RAD, SLAKE, PathVQA: closed and open medical VQA.

Accepted on-disk formats (one JSON list or JSONL file per split):
- LLaVA-Med test files: ``{id, image, conversations|conversatons: [human q, gpt a],
  answer_type: CLOSED|OPEN}`` (optionally ``modality``);
- the original SLAKE release: ``{qid, img_name, question, answer, answer_type, modality,
  q_lang}`` (only English questions are kept);
- the original VQA-RAD release: ``{qid, image_name, question, answer, answer_type,
  image_organ}``;
- plain question/answer records: ``{id, image, question|text, answer|gt_answer}``.
Without ``answer_type``, a yes/no answer is closed and anything else open (PathVQA's rule).
"""

from __future__ import annotations

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
from medsight.data.answer_text import normalize_answer

# Default modality per benchmark when entries carry none (for the per-modality tables).
DEFAULT_MODALITY = {"vqa_rad": "Radiology", "slake": "Radiology", "pathvqa": "Pathology"}


def _question_answer(entry: dict[str, Any], path: Path, where: str) -> tuple[str, str]:
    if "conversations" in entry or "conversatons" in entry:
        return first_exchange(entry, path, where)
    question = entry.get("question", entry.get("text"))
    answer = entry.get("answer", entry.get("gt_answer", entry.get("gpt4_answer")))
    if question is None or answer is None:
        raise BenchmarkFormatError(
            f"{path}: entry {where} needs 'conversations' or 'question' + 'answer' (keys: {', '.join(sorted(entry))})"
        )
    return str(question), str(answer)


def _task(entry: dict[str, Any], answer: str, path: Path, where: str) -> str:
    raw = entry.get("answer_type")
    if raw is None:
        return "closed" if normalize_answer(answer) in ("yes", "no") else "open"
    kind = str(raw).strip().upper()
    if kind not in ("CLOSED", "OPEN"):
        raise BenchmarkFormatError(f"{path}: entry {where}: answer_type {raw!r} is not CLOSED or OPEN")
    return kind.lower()


def read_vqa(
    path: Path,
    image_root: Path,
    benchmark: str,
    default_modality: str | None = None,
    language: str = "en",
) -> BenchmarkData:
    """Read one VQA-RAD/SLAKE/PathVQA split; ``image_root`` is what image paths are relative to."""
    path = Path(path)
    fallback_modality = default_modality or DEFAULT_MODALITY.get(benchmark, "all")
    samples: list[EvalSample] = []
    skipped: list[SkippedEntry] = []
    for index, entry in enumerate(load_json_entries(path)):
        sample_id = entry_id(entry, index)
        if "q_lang" in entry and str(entry["q_lang"]).lower() != language:
            continue  # SLAKE mixes English and Chinese questions; the benchmark is the English half
        question, answer = _question_answer(entry, path, sample_id)
        if not normalize_answer(answer):
            skipped.append(SkippedEntry(sample_id, "empty ground-truth answer"))
            continue
        image_path = resolve(image_root, first_image(entry, path, sample_id), f"{path}: entry {sample_id}")
        if not image_path.is_file():
            skipped.append(SkippedEntry(sample_id, f"image file missing: {image_path}"))
            continue
        modality_name = str(entry.get("modality") or fallback_modality)
        samples.append(
            EvalSample(
                benchmark=benchmark,
                sample_id=sample_id,
                task=_task(entry, answer, path, sample_id),
                question=clean_question(question),
                modality=canonical_modality(modality_name),
                image_path=image_path,
                source_modality=modality_name,
                answer=answer.strip(),
            )
        )
    return BenchmarkData(name=benchmark, source=path, samples=samples, skipped=skipped)
