"""Multiple-choice benchmarks: MMMU-Med and OmniMedVQA.

MMMU (Hugging Face release): one parquet per subject and split with columns ``id, question,
options`` (a Python-list string), ``answer`` (a letter), ``image_1..image_7`` (``{bytes,
path}`` structs), ``question_type``, ``subfield``. The same records as JSON/JSONL with image
paths are accepted too. MMMU-Med = the medical subjects, validation split (as HealthGPT).

OmniMedVQA: ``QA information/{Open-access,Restricted-access}/<dataset>.json`` lists of
``{question_id, dataset, question_type, question, gt_answer, image_path, option_A..option_D,
modality_type}``; ``gt_answer`` is the text of the correct option; image paths are relative to
the release root. The paper keeps HealthGPT's modality selection (``OMNIMED_MODALITIES``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from medsight.eval.benchmarks.common import (
    BenchmarkData,
    BenchmarkFormatError,
    EvalSample,
    SkippedEntry,
    canonical_modality,
    entry_id,
    load_json_entries,
    require,
    resolve,
)
from medsight.data.answer_text import normalize_answer

MMMU_MED_SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)
# HealthGPT's OmniMedVQA selection, as canonical modality names.
OMNIMED_MODALITIES = frozenset({"CT", "X-ray", "FP", "Micro", "OCT", "MRI", "US"})
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def format_mc_prompt(question: str, options: list[str]) -> str:
    lines = [question.strip()]
    lines += [f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options)]
    lines.append(MC_INSTRUCTION)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- MMMU


def _mmmu_records(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(source file, record) pairs from a parquet/JSON file or a directory of them."""
    files = sorted(path.rglob("*.parquet")) + sorted(path.rglob("*.json*")) if path.is_dir() else [path]
    if not files:
        raise BenchmarkFormatError(f"{path}: no .parquet or .json files found for MMMU")
    records: list[tuple[Path, dict[str, Any]]] = []
    for file in files:
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq  # only needed for the parquet release

            try:
                rows = pq.read_table(file).to_pylist()
            except Exception as error:  # pyarrow raises several unrelated types for bad files
                raise BenchmarkFormatError(f"{file}: cannot read parquet ({error})") from error
        else:
            rows = load_json_entries(file)
        records += [(file, row) for row in rows]
    return records


def _mmmu_options(raw: Any, file: Path, where: str) -> list[str]:
    if isinstance(raw, list):
        return [str(option) for option in raw]
    try:
        parsed = ast.literal_eval(str(raw))  # the release stores "['a', 'b']"
    except (ValueError, SyntaxError) as error:
        raise BenchmarkFormatError(f"{file}: entry {where}: 'options' is not a list ({raw!r})") from error
    if not isinstance(parsed, list):
        raise BenchmarkFormatError(f"{file}: entry {where}: 'options' is not a list ({raw!r})")
    return [str(option) for option in parsed]


def _mmmu_subject(sample_id: str) -> str:
    match = re.match(r"^(?:dev|validation|test)_(.+)_\d+$", sample_id)
    return match.group(1) if match else "unknown"


def mmmu_question_text(question: str) -> str:
    """Drop MMMU's ``<image N>`` markers at the start/end; inline ones read as "the image"."""
    question = re.sub(r"^\s*(<image \d+>\s*)+|(\s*<image \d+>)+\s*$", "", question)
    return re.sub(r"<image \d+>", "the image", question).strip()


def read_mmmu(path: Path, subjects: tuple[str, ...] | None = MMMU_MED_SUBJECTS) -> BenchmarkData:
    """MMMU-Med from the HF parquet layout (or JSON records); per-"modality" = subject."""
    path = Path(path)
    samples: list[EvalSample] = []
    skipped: list[SkippedEntry] = []
    for index, (file, record) in enumerate(_mmmu_records(path)):
        sample_id = entry_id(record, index)
        subject = _mmmu_subject(sample_id)
        if subjects is not None and subject not in subjects:
            continue
        if str(record.get("question_type", "multiple-choice")) != "multiple-choice":
            skipped.append(SkippedEntry(sample_id, "open question (MMMU-Med is scored on multiple choice)"))
            continue
        options = _mmmu_options(require(record, "options", file, sample_id), file, sample_id)
        letter = str(require(record, "answer", file, sample_id)).strip().upper()
        if len(letter) != 1 or not 0 <= ord(letter) - ord("A") < len(options):
            raise BenchmarkFormatError(f"{file}: entry {sample_id}: answer {letter!r} is not one of the option letters")
        image = record.get("image_1")
        image_bytes, image_path = None, None
        if isinstance(image, dict) and image.get("bytes"):
            image_bytes = bytes(image["bytes"])
        elif isinstance(image, str) and image:
            image_path = resolve(file.parent, image, f"{file}: entry {sample_id}")
            if not image_path.is_file():
                skipped.append(SkippedEntry(sample_id, f"image file missing: {image_path}"))
                continue
        else:
            skipped.append(SkippedEntry(sample_id, "no image_1"))
            continue
        question = mmmu_question_text(str(require(record, "question", file, sample_id)))
        samples.append(
            EvalSample(
                benchmark="mmmu_med",
                sample_id=sample_id,
                task="mc",
                question=format_mc_prompt(question, options),
                modality=subject,
                image_path=image_path,
                image_bytes=image_bytes,
                answer=options[ord(letter) - ord("A")],
                options=options,
                answer_index=ord(letter) - ord("A"),
            )
        )
    return BenchmarkData(name="mmmu_med", source=path, samples=samples, skipped=skipped)


# ---------------------------------------------------------------------------- OmniMedVQA


def _omnimed_files(root: Path) -> list[Path]:
    qa_dir = root / "QA information"
    files = sorted(qa_dir.rglob("*.json")) if qa_dir.is_dir() else sorted(root.rglob("*.json"))
    if not files:
        raise BenchmarkFormatError(f"{root}: no OmniMedVQA JSON files (expected 'QA information/Open-access/*.json')")
    return files


def read_omnimedvqa(root: Path, modalities: frozenset[str] | None = OMNIMED_MODALITIES) -> BenchmarkData:
    """OmniMedVQA from its release root (image paths inside the JSON are relative to it)."""
    root = Path(root)
    samples: list[EvalSample] = []
    skipped: list[SkippedEntry] = []
    for file in _omnimed_files(root):
        for index, entry in enumerate(load_json_entries(file)):
            sample_id = entry_id(entry, index, "question_id")
            # One released file spells the key "modality" instead of "modality_type".
            modality_raw = str(entry.get("modality_type", entry.get("modality", "unknown")))
            modality = canonical_modality(modality_raw)
            if modalities is not None and modality not in modalities:
                continue
            letters = sorted(key for key in entry if re.fullmatch(r"option_[A-Z]", key))
            options = [str(entry[key]) for key in letters]
            if not options:
                raise BenchmarkFormatError(f"{file}: entry {sample_id} has no option_A.. keys")
            truth = str(require(entry, "gt_answer", file, sample_id)).strip()
            matches = [i for i, option in enumerate(options) if option.strip() == truth]
            if not matches:
                matches = [i for i, o in enumerate(options) if normalize_answer(o) == normalize_answer(truth)]
            if not matches:
                skipped.append(SkippedEntry(sample_id, f"gt_answer {truth!r} matches no option"))
                continue
            image_path = resolve(root, str(require(entry, "image_path", file, sample_id)), f"{file}: entry {sample_id}")
            if not image_path.is_file():
                skipped.append(SkippedEntry(sample_id, f"image file missing: {image_path}"))
                continue
            samples.append(
                EvalSample(
                    benchmark="omnimedvqa",
                    sample_id=f"{entry.get('dataset', file.stem)}/{sample_id}",
                    task="mc",
                    question=format_mc_prompt(str(require(entry, "question", file, sample_id)), options),
                    modality=modality,
                    image_path=image_path,
                    source_modality=modality_raw,
                    answer=options[matches[0]],
                    options=options,
                    answer_index=matches[0],
                )
            )
    return BenchmarkData(name="omnimedvqa", source=root, samples=samples, skipped=skipped)
