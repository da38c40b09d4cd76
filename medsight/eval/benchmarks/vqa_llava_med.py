"""VQA-RAD, SLAKE, PathVQA: closed and open medical VQA.

Accepted on-disk formats (one JSON list or JSONL file per split):
- LLaVA-Med test files: ``{id, image, conversations|conversatons: [human q, gpt a],
  answer_type: CLOSED|OPEN}`` (optionally ``modality``);
- the original SLAKE release: ``{qid, img_name, question, answer, answer_type, modality,
  q_lang}`` (only English questions are kept);
- the original VQA-RAD release (``VQA_RAD Dataset Public.json``, train and test in one file):
  ``{qid, image_name, question, answer, answer_type, image_organ, phrase_type}``; the test split
  is the questions whose ``phrase_type`` is ``test_freeform``/``test_para`` (451), and ``split``
  selects it (the other ~1,800 are training questions);
- Hugging Face parquet (flaviagiammarino/vqa-rad, flaviagiammarino/path-vqa): columns ``image``
  (``{bytes, path}``), ``question``, ``answer``; ``path`` is a parquet file or the dataset folder,
  whose ``data/{split}-*.parquet`` files are read;
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
    embedded_image,
    entry_id,
    first_exchange,
    first_image,
    load_json_entries,
    parquet_files,
    parquet_rows,
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


def _in_split(entry: dict[str, Any], split: str | None) -> bool:
    """The original VQA-RAD file mixes splits: ``phrase_type`` test_* marks the test questions."""
    phrase = entry.get("phrase_type")
    if split is None or phrase is None:
        return True
    return str(phrase).startswith("test") == (split == "test")


def _entries(path: Path, split: str | None) -> list[tuple[dict[str, Any], Path]]:
    if path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet"))):
        return [(row, file) for file in parquet_files(path, split) for row in parquet_rows(file)]
    return [(entry, path) for entry in load_json_entries(path) if _in_split(entry, split)]


def read_vqa(
    path: Path,
    image_root: Path | None = None,
    benchmark: str = "vqa",
    default_modality: str | None = None,
    language: str = "en",
    split: str | None = "test",
) -> BenchmarkData:
    """Read one VQA-RAD/SLAKE/PathVQA split; ``image_root`` is what image paths are relative to
    (default: the file's folder; parquet releases embed their images)."""
    path = Path(path)
    fallback_modality = default_modality or DEFAULT_MODALITY.get(benchmark, "all")
    samples: list[EvalSample] = []
    skipped: list[SkippedEntry] = []
    for index, (entry, file) in enumerate(_entries(path, split)):
        sample_id = entry_id(entry, index)
        if "q_lang" in entry and str(entry["q_lang"]).lower() != language:
            continue  # SLAKE mixes English and Chinese questions; the benchmark is the English half
        question, answer = _question_answer(entry, file, sample_id)
        if not normalize_answer(answer):
            skipped.append(SkippedEntry(sample_id, "empty ground-truth answer"))
            continue
        image_bytes, image_path = embedded_image(entry.get("image")), None
        if image_bytes is None:
            image_path = resolve(Path(image_root) if image_root else file.parent, first_image(entry, file, sample_id),
                                 f"{file}: entry {sample_id}")
            if not image_path.is_file():
                skipped.append(SkippedEntry(sample_id, f"image file missing: {image_path}"))
                continue
        modality_name = str(entry.get("modality") or fallback_modality)
        samples.append(
            EvalSample(
                benchmark=benchmark,
                sample_id=sample_id,
                task=_task(entry, answer, file, sample_id),
                question=clean_question(question),
                modality=canonical_modality(modality_name),
                image_path=image_path,
                image_bytes=image_bytes,
                source_modality=modality_name,
                answer=answer.strip(),
            )
        )
    return BenchmarkData(name=benchmark, source=path, samples=samples, skipped=skipped)
