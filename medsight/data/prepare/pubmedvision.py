"""``medsight data prepare pubmedvision SRC DEST``: the alignment and instruct sets as published.

Reads ``PubMedVision_Alignment_VQA.json`` and ``PubMedVision_InstructionTuning_VQA.json`` (lists
of ``{id, image: [paths], conversations: [{from, value}], modality, body_part}``, image paths
relative to the release root) as streams. Rows keep every image (multi-image rows are common) and
their free-text ``modality``/``body_part`` as metadata; rows with a missing image or a malformed
conversation are skipped and reported (the release has a few). A seeded hash carves val out of
each file, and stage 5's instruct set is a seeded uniform sample of ``instruct_samples`` rows
(the paper's 60K). Output, JSON lines with image paths relative to ``DEST``::

    DEST/pubmedvision/{alignment_train,alignment_val,instruct_train,instruct_val}.jsonl
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import ijson
from tqdm.auto import tqdm

from medsight.data.prepare.report import ProblemLog, bad_fraction, finish_report, problems_path, report_path
from medsight.data.prepare.sampling import smallest_ranked, stable_rank
from medsight.io_utils import atomic_directory, atomic_write_json

RELEASE = "pubmedvision"
OUTPUT_DIR = "pubmedvision"
FILES = {"alignment": "PubMedVision_Alignment_VQA.json", "instruct": "PubMedVision_InstructionTuning_VQA.json"}


@dataclass
class PubMedVisionOptions:
    val_fraction: float = 0.01
    instruct_samples: int = 60_000  # stage 5's PubMedVision share (paper: 60K)
    seed: int = 0
    max_bad_fraction: float = 0.01
    image_root: str = ""  # where image paths are relative to ("" = SRC)


@dataclass
class PubMedVisionSummary:
    dest: Path
    seen: Counter = field(default_factory=Counter)  # file kind -> rows read
    written: Counter = field(default_factory=Counter)  # output name -> rows
    bad: int = 0
    multi_image: int = 0

    def table(self) -> str:
        lines = [f"{'set':18s} {'rows':>9s}"] + [f"{name:18s} {n:9d}" for name, n in sorted(self.written.items())]
        lines.append(f"rows read: {dict(self.seen)}; multi-image rows kept: {self.multi_image}; skipped as bad: {self.bad}")
        return "\n".join(lines)


def _rows(path: Path) -> Iterator[Any]:
    with open(path, "rb") as handle:
        yield from ijson.items(handle, "item", use_float=True)


def _problem_with(row: Any, image_root: Path) -> tuple[str, str, str] | None:
    """(kind, reason, file at fault: "" = the JSON file) of a row that cannot be used, or None."""
    if not isinstance(row, dict) or "id" not in row:
        return "bad entry", "row is not an object with an 'id'", ""
    images = row.get("image")
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        return "bad entry", "'image' must be a path or a non-empty list of paths", ""
    turns = row.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or not all(
        isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") in ("human", "gpt") for t in turns
    ):
        return "bad entry", "'conversations' must be a list of {from: human|gpt, value} turns", ""
    if [t["from"] for t in turns] != ["human", "gpt"] * (len(turns) // 2) or len(turns) % 2:
        return "bad entry", "turns must alternate human, gpt", ""
    for image in images:
        if not (image_root / image).is_file():
            return "missing image", "image file does not exist", str(image_root / image)
    return None


Row = tuple[str, int, str]  # (id, position in the file, output line)


class _Carver:
    """Streams val rows to their file and passes train rows on; holds back the lowest-ranked
    train row so that val is never empty when a file has two usable rows or more."""

    def __init__(self, val: IO[str], fraction: float, seed: int, salt: str) -> None:
        self.val, self.fraction, self.seed, self.salt = val, fraction, seed, salt
        self.held: tuple[int, Row] | None = None
        self.counts: Counter = Counter()

    def add(self, row: Row) -> Row | None:
        rank = stable_rank(self.seed, self.salt, row[0])
        if rank < self.fraction * 2**64:
            self.val.write(row[2])
            self.counts["val"] += 1
            return None
        if self.fraction > 0 and (self.held is None or rank < self.held[0]):
            previous = self.held[1] if self.held else None
            self.held = (rank, row)
            row = previous
        if row is not None:
            self.counts["train"] += 1
        return row

    def finish(self) -> Row | None:
        """The held row: to val if val is still empty (and train keeps a row), else to train."""
        if self.held is None:
            return None
        row = self.held[1]
        if self.counts["val"] == 0 and self.counts["train"] > 0:
            self.val.write(row[2])
            self.counts["val"] += 1
            return None
        self.counts["train"] += 1
        return row


def _output_row(row: dict[str, Any], image_root: Path, dest: Path) -> dict[str, Any]:
    images = [row["image"]] if isinstance(row["image"], str) else row["image"]
    base = os.path.relpath(image_root, dest)
    return {**row, "id": str(row["id"]), "image": [f"{base}/{image}" if base != "." else image for image in images]}


def prepare_pubmedvision(source: Path, dest: Path, options: PubMedVisionOptions | None = None,
                         progress: bool = True) -> PubMedVisionSummary:
    options = options or PubMedVisionOptions()
    source, dest = Path(source).resolve(), Path(dest).resolve()
    image_root = Path(options.image_root).resolve() if options.image_root else source
    for kind, name in FILES.items():
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source / name}: PubMedVision {kind} file not found; SRC must hold {', '.join(FILES.values())}")
    summary = PubMedVisionSummary(dest)
    report_path(dest, RELEASE).parent.mkdir(parents=True, exist_ok=True)
    problems_final = problems_path(dest, RELEASE)
    problems_tmp = problems_final.with_suffix(".jsonl.tmp")
    finished = False
    try:
        with ExitStack() as stack, atomic_directory(dest / OUTPUT_DIR) as folder:
            log = ProblemLog(stack.enter_context(open(problems_tmp, "w", encoding="utf-8")), root=str(dest))
            files = {f"{kind}_{split}": stack.enter_context(open(folder / f"{kind}_{split}.jsonl", "w", encoding="utf-8"))
                     for kind in FILES for split in ("train", "val")}
            bar = stack.enter_context(tqdm(desc="prepare pubmedvision", unit="row", disable=not progress))
            for kind, name in FILES.items():
                carver = _Carver(files[f"{kind}_val"], options.val_fraction, options.seed, kind)

                def usable(kind=kind, name=name, carver=carver) -> Iterator[Row]:
                    for index, row in enumerate(_rows(source / name)):
                        bar.update(1)
                        summary.seen[kind] += 1
                        problem = _problem_with(row, image_root)
                        if problem is not None:
                            row_id = row.get("id", index) if isinstance(row, dict) else index
                            log.problem(problem[2] or str(source / name), f"row {row_id} of {name}: {problem[1]}",
                                        "row skipped", problem[0], file_kind=kind)
                            summary.bad += 1
                            continue
                        summary.multi_image += isinstance(row["image"], list) and len(row["image"]) > 1
                        passed = carver.add((str(row["id"]), index, json.dumps(_output_row(row, image_root, dest)) + "\n"))
                        if passed is not None:
                            yield passed
                    held = carver.finish()
                    if held is not None:
                        yield held

                if kind == "instruct":  # stage 5 draws a seeded uniform sample; the rest is unused
                    rows = ((row[0], row) for row in usable())
                    sample = smallest_ranked(rows, options.instruct_samples, options.seed, "instruct-sample")
                    lines = [row[2] for row in sorted(sample, key=lambda row: row[1])]
                else:
                    lines = (row[2] for row in usable())
                for line in lines:
                    files[f"{kind}_train"].write(line)
                    summary.written[f"{kind}_train"] += 1
                summary.written[f"{kind}_val"] = carver.counts["val"]
            seen = sum(summary.seen.values())
            report = {"release": RELEASE, "source": os.path.relpath(source, dest), "options": asdict(options),
                      "seen": seen, "bad": summary.bad, "bad_fraction": bad_fraction(summary.bad, seen),
                      "multi_image_rows": summary.multi_image, "written": dict(summary.written), **log.to_dict()}
            stack.close()
            finished = True
            finish_report(dest, RELEASE, report, options.max_bad_fraction)
            atomic_write_json(folder / "summary.json", {"seen": dict(summary.seen), "written": dict(summary.written),
                                                        "multi_image_rows": summary.multi_image})
    finally:
        if finished and problems_tmp.exists():
            os.replace(problems_tmp, problems_final)
        elif problems_tmp.exists():
            problems_tmp.unlink()
    return summary
