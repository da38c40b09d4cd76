"""Multiple-choice benchmarks: MMMU-Med and OmniMedVQA.

MMMU (Hugging Face release): one parquet per subject and split (``<Subject>/{dev,validation,
test}-00000-of-00001.parquet``) with columns ``id, question, options`` (a Python-list string),
``answer`` (a letter), ``image_1..image_7`` (``{bytes, path}`` structs), ``question_type``,
``subfield``. The same records as JSON/JSONL with image paths are accepted too. MMMU-Med = the
validation split of the Health & Medicine subjects (as HealthGPT and the authors' evaluation);
only ``split`` files and ids are read, never dev/test. A question with several images gets one
picture holding all of them side by side (the model takes one image), and its ``<image N>``
markers are rewritten to name their position.

OmniMedVQA: ``QA information/{Open-access,Restricted-access}/<dataset>.json`` lists of
``{question_id, dataset, question_type, question, gt_answer, image_path, option_A..option_D,
modality_type}``; ``gt_answer`` is the text of the correct option; image paths are relative to
the release root. The paper keeps HealthGPT's modality selection (``OMNIMED_MODALITIES``).
"""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path
from typing import Any

from medsight.eval.benchmarks.common import (
    BenchmarkData,
    BenchmarkFormatError,
    EvalSample,
    SkippedEntry,
    canonical_modality,
    embedded_image,
    entry_id,
    load_json_entries,
    parquet_files,
    parquet_rows,
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


MMMU_IMAGE_COLUMNS = tuple(f"image_{n}" for n in range(1, 8))


def _mmmu_records(path: Path, split: str) -> list[tuple[Path, dict[str, Any]]]:
    """(source file, record) pairs of ``split`` from a parquet/JSON file or a release folder."""
    if path.is_dir() and not any(path.rglob("*.parquet")):
        files = sorted(path.rglob("*.json*"))
        if not files:
            raise BenchmarkFormatError(f"{path}: no .parquet or .json files found for MMMU")
        return [(file, row) for file in files for row in load_json_entries(file)]
    if path.is_file() and path.suffix != ".parquet":
        return [(path, row) for row in load_json_entries(path)]
    return [(file, row) for file in parquet_files(path, split) for row in parquet_rows(file)]


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


def _mmmu_split_and_subject(sample_id: str) -> tuple[str, str]:
    match = re.match(r"^(dev|validation|test)_(.+)_\d+$", sample_id)
    return (match.group(1), match.group(2)) if match else ("unknown", "unknown")


def mmmu_question_text(question: str, images: int = 1) -> str:
    """Drop MMMU's ``<image N>`` markers at the start/end; inline ones read as "the image" (one
    image) or "image N (N-th from the left)" (several, shown side by side)."""
    question = re.sub(r"^\s*(<image \d+>\s*)+|(\s*<image \d+>)+\s*$", "", question)
    if images > 1:
        return re.sub(r"<image (\d+)>", r"image \1 (number \1 from the left)", question).strip()
    return re.sub(r"<image \d+>", "the image", question).strip()


def side_by_side(images: list[bytes], where: str) -> bytes:
    """Encoded images -> one PNG holding them left to right at a common height."""
    from PIL import Image

    decoded = []
    for data in images:
        try:
            with Image.open(io.BytesIO(data)) as handle:
                decoded.append(handle.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:
            raise BenchmarkFormatError(f"{where}: cannot decode an embedded image ({error})") from error
    height = max(image.height for image in decoded)
    scaled = [image.resize((max(1, round(image.width * height / image.height)), height)) for image in decoded]
    canvas = Image.new("RGB", (sum(image.width for image in scaled), height))
    x = 0
    for image in scaled:
        canvas.paste(image, (x, 0))
        x += image.width
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def _mmmu_images(record: dict[str, Any], file: Path, sample_id: str) -> tuple[list[bytes], str | None]:
    """The question's images, in column order, as bytes; or (_, reason) when one is missing."""
    images: list[bytes] = []
    for column in MMMU_IMAGE_COLUMNS:
        value = record.get(column)
        if value is None or value == "":
            continue
        data = embedded_image(value)
        if data is None and isinstance(value, str):
            image_path = resolve(file.parent, value, f"{file}: entry {sample_id}")
            if not image_path.is_file():
                return [], f"image file missing: {image_path}"
            data = image_path.read_bytes()
        if data is None:
            return [], f"{column} holds no image"
        images.append(data)
    return images, None if images else "no image_1"


def read_mmmu(path: Path, subjects: tuple[str, ...] | None = MMMU_MED_SUBJECTS, split: str = "validation") -> BenchmarkData:
    """MMMU-Med from the HF parquet layout (or JSON records); per-"modality" = subject."""
    path = Path(path)
    samples: list[EvalSample] = []
    skipped: list[SkippedEntry] = []
    subjects = tuple(subjects) if subjects is not None else None
    for index, (file, record) in enumerate(_mmmu_records(path, split)):
        sample_id = entry_id(record, index)
        record_split, subject = _mmmu_split_and_subject(sample_id)
        if record_split not in (split, "unknown") or (subjects is not None and subject not in subjects):
            continue
        if str(record.get("question_type", "multiple-choice")) != "multiple-choice":
            skipped.append(SkippedEntry(sample_id, "open question (MMMU-Med is scored on multiple choice)"))
            continue
        options = _mmmu_options(require(record, "options", file, sample_id), file, sample_id)
        letter = str(require(record, "answer", file, sample_id)).strip().upper()
        if len(letter) != 1 or not 0 <= ord(letter) - ord("A") < len(options):
            raise BenchmarkFormatError(f"{file}: entry {sample_id}: answer {letter!r} is not one of the option letters")
        images, problem = _mmmu_images(record, file, sample_id)
        if problem is not None:
            skipped.append(SkippedEntry(sample_id, problem))
            continue
        question = mmmu_question_text(str(require(record, "question", file, sample_id)), len(images))
        samples.append(
            EvalSample(
                benchmark="mmmu_med",
                sample_id=sample_id,
                task="mc",
                question=format_mc_prompt(question, options),
                modality=subject,
                image_bytes=images[0] if len(images) == 1 else side_by_side(images, f"{file}: {sample_id}"),
                answer=options[ord(letter) - ord("A")],
                options=options,
                answer_index=ord(letter) - ord("A"),
                num_images=len(images),
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
