"""What every benchmark reader produces, and the parsing helpers they share.

Readers turn a benchmark's own public file format into ``EvalSample``s. Structural problems
(a missing key, a wrong type) raise ``BenchmarkFormatError`` naming the file and the entry;
entries whose image or mask file is absent are skipped and listed in ``BenchmarkData.skipped``
so a report can say how many were left out and why (MeCoVQA-G ships such entries).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsight.data.taxonomy import Taxonomy

TASKS = ("closed", "open", "mc", "diagseg", "grounding", "box")
Box = tuple[float, float, float, float]  # normalised (x1, y1, x2, y2)


class BenchmarkFormatError(ValueError):
    """A benchmark file does not have the expected structure; the message names file and entry."""


@dataclass
class EvalSample:
    benchmark: str  # e.g. "vqa_rad", "diagseg"
    sample_id: str
    task: str  # one of TASKS: decides how the answer is scored
    question: str  # prompt sent to the model, without the <image> marker
    modality: str  # display name for per-modality tables (canonical_modality)
    image_path: Path | None = None
    image_bytes: bytes | None = None  # images embedded in parquet (MMMU, S-Chain)
    # The modality as the benchmark spells it; matched against the evaluated model's taxonomy
    # (model_modality) when the questions are asked, since readers do not know the model.
    source_modality: str | None = None
    answer: str = ""  # ground-truth answer text (region tokens kept, if any)
    options: list[str] = field(default_factory=list)  # multiple choice, in letter order
    answer_index: int = -1  # multiple choice: index into options
    mask_paths: list[Path] = field(default_factory=list)  # ground truth, in answer order
    boxes: list[Box] = field(default_factory=list)  # ground-truth boxes, normalised xyxy
    diagnosis: str = ""  # DiagSeg: the finding the answer must name
    # Ground-truth regions made of several mask files (DiagSeg ``mask_ids`` entries that are lists):
    # the number of consecutive ``mask_paths`` each region unites; empty = one file per region.
    mask_groups: list[int] = field(default_factory=list)
    num_images: int = 1  # images the question shows (several are tiled into image_bytes)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"{self.benchmark}/{self.sample_id}: unknown task {self.task!r}")
        if self.image_path is None and self.image_bytes is None:
            raise ValueError(f"{self.benchmark}/{self.sample_id}: no image")


@dataclass(frozen=True)
class SkippedEntry:
    sample_id: str
    reason: str


@dataclass
class BenchmarkData:
    name: str
    source: Path  # the file read
    samples: list[EvalSample]
    skipped: list[SkippedEntry] = field(default_factory=list)


# ---------------------------------------------------------------------------- modalities

# Canonical short names, in the column order of the paper's tables (then anything else).
MODALITY_ORDER = ("CT", "MRI", "X-ray", "Path", "US", "End", "Der", "OCT", "PET", "FP", "Micro")
_ALIASES = {
    "ct": "CT", "computed tomography": "CT",
    "mri": "MRI", "mr": "MRI", "magnetic resonance imaging": "MRI",
    "x-ray": "X-ray", "xray": "X-ray", "x_ray": "X-ray", "x ray": "X-ray", "cxr": "X-ray",
    "x-ray radiography": "X-ray",
    "pathology": "Path", "path": "Path", "digital pathology": "Path", "histopathology": "Path",
    "ultrasound": "US", "us": "US",
    "endoscopy": "End", "endoscope": "End", "end": "End",
    "dermoscopy": "Der", "dermatoscopy": "Der", "der": "Der",
    "oct": "OCT", "optical coherence tomography": "OCT",
    "pet": "PET", "positron emission tomography": "PET",
    "fundus": "FP", "fundus photography": "FP", "fp": "FP",
    "microscopy": "Micro", "microscopy images": "Micro",
}


def canonical_modality(name: str) -> str:
    """'CT(Computed Tomography)', 'ct_00', 'X-Ray' -> 'CT', 'CT', 'X-ray'; unknown names unchanged."""
    raw = name.strip()
    key = raw.lower()
    if key in _ALIASES:
        return _ALIASES[key]
    head = re.split(r"[(\[]", key)[0].strip()  # OmniMedVQA spells "CT(Computed Tomography)"
    if head in _ALIASES:
        return _ALIASES[head]
    head = re.sub(r"_\d+$", "", head)  # SA-Med2D prefixes: "ct_00", "mr_t1" handled below
    if head in _ALIASES:
        return _ALIASES[head]
    first = re.split(r"[_\s]", head)[0]
    return _ALIASES.get(first, raw)


def model_modality(name: str, taxonomy: Taxonomy) -> str | None:
    """The modality of ``taxonomy`` (the model's) that matches ``name``, if any."""
    if name in taxonomy.modalities:
        return name
    wanted = canonical_modality(name)
    for known in taxonomy.modalities:
        if canonical_modality(known) == wanted:
            return known
    return None


def modality_sort_key(name: str) -> tuple[int, str]:
    return (MODALITY_ORDER.index(name), "") if name in MODALITY_ORDER else (len(MODALITY_ORDER), name)


# ---------------------------------------------------------------------------- file parsing


def load_json_entries(path: Path) -> list[dict[str, Any]]:
    """A JSON list or a JSONL file -> list of dict entries, with errors that name the line."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: benchmark file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise BenchmarkFormatError(f"{path}:{number}: not valid JSON ({error})") from error
    else:
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise BenchmarkFormatError(f"{path}: not valid JSON ({error})") from error
    if isinstance(entries, dict):
        # Some releases wrap the list: {"data": [...]} / {"annotations": [...]}.
        lists = [value for value in entries.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise BenchmarkFormatError(f"{path}: expected a list of entries, got an object with keys {sorted(entries)}")
        entries = lists[0]
    if not isinstance(entries, list):
        raise BenchmarkFormatError(f"{path}: expected a list of entries, got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BenchmarkFormatError(f"{path}: entry {index} is {type(entry).__name__}, expected an object")
    return entries


def entry_id(entry: dict[str, Any], index: int, *keys: str) -> str:
    for key in (*keys, "id", "question_id", "qid"):
        if key in entry and entry[key] not in (None, ""):
            return str(entry[key])
    return str(index)


def require(entry: dict[str, Any], key: str, path: Path, where: str) -> Any:
    if key not in entry:
        raise BenchmarkFormatError(f"{path}: entry {where} has no {key!r} key (keys: {', '.join(sorted(entry))})")
    return entry[key]


def first_exchange(entry: dict[str, Any], path: Path, where: str) -> tuple[str, str]:
    """(question, answer) of the first human/gpt exchange of a LLaVA conversation entry."""
    # LLaVA-Med's released test files spell the key "conversatons".
    turns = entry.get("conversations", entry.get("conversatons"))
    if not isinstance(turns, list) or not turns:
        raise BenchmarkFormatError(f"{path}: entry {where} has no 'conversations' list")
    question = answer = None
    for turn in turns:
        if not isinstance(turn, dict) or "value" not in turn:
            raise BenchmarkFormatError(f"{path}: entry {where}: each turn needs 'from' and 'value'")
        role = str(turn.get("from", turn.get("role", ""))).lower()
        if role in ("human", "user") and question is None:
            question = str(turn["value"])
        elif role in ("gpt", "assistant") and question is not None and answer is None:
            answer = str(turn["value"])
    if question is None or answer is None:
        raise BenchmarkFormatError(f"{path}: entry {where} has no human question followed by a gpt answer")
    return question, answer


def clean_question(text: str) -> str:
    """Drop the <image> placeholder (the model inserts its visual tokens itself)."""
    return re.sub(r"\s+", " ", text.replace("<image>", " ")).strip()


def first_image(entry: dict[str, Any], path: Path, where: str, *keys: str) -> str:
    for key in (*keys, "image", "image_path", "img_name", "image_name"):
        value = entry.get(key)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str) and value:
            return value
    raise BenchmarkFormatError(f"{path}: entry {where} names no image (looked for {', '.join((*keys, 'image', 'image_path', 'img_name', 'image_name'))})")


def resolve(root: Path, relative: str, where: str = "") -> Path:
    """``root / relative``, refused (naming ``where``, the file and entry) when it would read
    outside ``root``: an absolute path, a ``..`` escape or a symlink leading elsewhere."""
    from medsight.data.safe_paths import UnsafePathError, resolve_under

    try:
        return resolve_under(Path(root), relative, where or f"benchmark path under {root}")
    except UnsafePathError as error:
        raise BenchmarkFormatError(str(error)) from None


# ---------------------------------------------------------------------------- parquet releases


def parquet_files(path: Path, split: str | None) -> list[Path]:
    """A parquet file, or the files of ``split`` under a Hugging Face dataset folder
    (``data/test-00000-of-00001-<hash>.parquet``, ``Clinical_Medicine/validation-00000-of-00001.parquet``)."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else []
    if split is not None:
        files = [f for f in files if f.name.startswith(f"{split}-")]
    if not files:
        raise BenchmarkFormatError(f"{path}: no {split + '-*' if split else ''}.parquet file found")
    return files


def parquet_rows(file: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # only needed for parquet releases

    try:
        return pq.read_table(file).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for bad files
        raise BenchmarkFormatError(f"{file}: cannot read parquet ({error})") from error


def embedded_image(value: Any) -> bytes | None:
    """The bytes of a Hugging Face ``Image`` cell (``{bytes, path}``), if any."""
    if isinstance(value, dict) and value.get("bytes"):
        return bytes(value["bytes"])
    return None
