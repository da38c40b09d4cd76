"""Which answer formats the evaluated model was trained on, so the report says what it measured.

A benchmark asking in a format the model never saw in training (a multiple-choice question
answered with an option letter, when the instruction data holds none) measures the format, not
the model: the report marks it and leaves it out of the averages unless asked for.

The training formats are read from the evaluation's ``data`` input: the instruction-tuning
conversations stage 5 reads (``pubmedvision/instruct_train.jsonl``, as ``medsight data prepare
pubmedvision`` writes it; ``llava/instruct_train.json`` in older datasets). A human turn holding
the multiple-choice instruction or an ``A. ... / B. ...`` option list counts as multiple-choice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medsight.eval.benchmarks.multiple_choice import MC_INSTRUCTION

MULTIPLE_CHOICE = "multiple-choice"
FREE_TEXT = "free-text"
INSTRUCT_FILES = (Path("pubmedvision") / "instruct_train.jsonl", Path("llava") / "instruct_train.json")
# Metric a benchmark reports when its questions are multiple-choice (see eval/metrics.py).
_FORMAT_METRICS = {MULTIPLE_CHOICE: "mc_accuracy"}
_OPTION_LINES = re.compile(r"^\s*[A-H][.)]\s+\S", re.MULTILINE)


def _is_multiple_choice(text: str) -> bool:
    return MC_INSTRUCTION in text or len(_OPTION_LINES.findall(text)) >= 2


def formats_of(questions: Iterable[str]) -> list[str]:
    found = {MULTIPLE_CHOICE if _is_multiple_choice(question) else FREE_TEXT for question in questions}
    return sorted(found)


def trained_formats(data_root: Path) -> list[str] | None:
    """Formats of the instruction data under ``data_root``; None when it holds no such file (unknown)."""
    path = next((Path(data_root) / name for name in INSTRUCT_FILES if (Path(data_root) / name).is_file()), None)
    if path is None:
        return None
    try:
        text = path.read_text()
        entries = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except (OSError, json.JSONDecodeError):
        return None
    questions = [turn.get("value", "") for entry in entries for turn in entry.get("conversations", [])
                 if turn.get("from") == "human"]
    return formats_of(questions)


def untrained_benchmarks(summaries: Mapping[str, Mapping[str, Any]], formats: list[str] | None) -> list[str]:
    """Benchmarks whose format is not among ``formats`` (none when the formats are unknown)."""
    if formats is None:
        return []
    return sorted(name for name, metrics in summaries.items()
                  if any(metric in metrics and kind not in formats for kind, metric in _FORMAT_METRICS.items()))
