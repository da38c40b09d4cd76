"""Training curves for the report: recorded beside each stage output, collected by lineage.

``HistoryRecorder`` (medsight.train.tracker) wraps any ``Tracker`` and also appends every ``log_metrics`` call with a
step to ``<stage output>/history.jsonl`` (``{"step": 20, "perceiver-pretrain/loss": 0.41}``).
``collect_curves`` walks an evaluation's inputs and their recorded upstream inputs
(``stage.json`` -> ``inputs``) and gathers every series it finds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medsight.train.tracker import HISTORY_FILE, HistoryRecorder  # noqa: F401  (re-exported)

Curves = dict[str, list[tuple[float, float]]]


def read_history(path: Path, prefix: str = "") -> Curves:
    """Series from one ``history.jsonl``; a torn last line (interrupted run) is ignored."""
    curves: Curves = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step")
        if step is None:
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                curves.setdefault(f"{prefix}{key}", []).append((float(step), float(value)))
    return curves


def lineage(directories: list[Path]) -> list[Path]:
    """The given stage outputs and every upstream output their ``stage.json`` names."""
    seen: list[Path] = []
    queue = [Path(d) for d in directories]
    while queue:
        directory = queue.pop(0)
        if directory in seen or not directory.is_dir():
            continue
        seen.append(directory)
        stage_file = directory / "stage.json"
        if stage_file.is_file():
            try:
                record = json.loads(stage_file.read_text())
            except (OSError, ValueError):
                record = {}  # curves are optional: a damaged record only loses its lineage
            inputs = record.get("inputs") if isinstance(record, dict) else None
            for entry in (inputs.values() if isinstance(inputs, dict) else ()):
                path = entry.get("path") if isinstance(entry, dict) else entry
                if isinstance(path, str):
                    queue.append(Path(path))
    return seen


def collect_curves(directories: list[Path]) -> Curves:
    curves: Curves = {}
    for directory in lineage(directories):
        history = directory / HISTORY_FILE
        if history.is_file():
            for name, points in read_history(history).items():
                curves.setdefault(name, []).extend(points)
    return {name: sorted(points) for name, points in curves.items()}
