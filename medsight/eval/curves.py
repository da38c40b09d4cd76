"""Training curves for the report, carried by the outputs' lineage (``stages/lineage.py``).

``HistoryRecorder`` (medsight.train.tracker) keeps every stepped metric of a stage in
``<stage output>/history.jsonl`` (``{"step": 20, "perceiver-pretrain/loss": 0.41}``). Each
output's ``lineage.json`` carries the histories and final metrics of every output upstream of
it, so ``collect_curves`` finds every training stage's curve from the evaluation's inputs alone,
wherever those inputs were pulled to (a KFP workspace never holds the inputs' inputs).

Series are named ``<stage>/<metric>``. A stage's validation values (its ``val_*`` metrics,
measured once at the end of training) become one-point series ``<stage>/val_<metric>`` at the
stage's last step, which the report draws as markers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medsight.stages.lineage import read_history as _lineage_history
from medsight.stages.lineage import read_lineage
from medsight.train.tracker import HISTORY_FILE, HistoryRecorder  # noqa: F401  (re-exported)

Curves = dict[str, list[tuple[float, float]]]
VALIDATION_PREFIX = "val_"


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


def _entry_curves(entry: dict[str, Any]) -> Curves:
    """Training series plus validation points of one stage output (a lineage ``upstream`` entry)."""
    curves: Curves = {name: [(float(x), float(y)) for x, y in points] for name, points in entry.get("history", {}).items()}
    stage = entry.get("stage", "")
    if not curves or not stage:
        return curves
    last_step = max(points[-1][0] for points in curves.values() if points)
    for name, value in entry.get("metrics", {}).items():
        if name.startswith(VALIDATION_PREFIX) and math.isfinite(value):
            curves[f"{stage}/{name}"] = [(last_step, float(value))]
    return curves


def _local_entry(directory: Path) -> dict[str, Any]:
    """The same shape as a lineage ``upstream`` entry, read from an output folder on disk."""
    stage_file = directory / "stage.json"
    metrics_file = directory / "metrics.json"
    stage = ""
    if stage_file.is_file():
        try:
            stage = json.loads(stage_file.read_text()).get("stage", "")
        except json.JSONDecodeError:
            stage = ""
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    except json.JSONDecodeError:
        metrics = {}
    history = _lineage_history(directory)
    if not stage and history:
        stage = next(iter(history)).split("/", 1)[0]
    return {"stage": stage, "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "history": history}


def lineage(directories: list[Path]) -> list[Path]:
    """The given stage outputs and every upstream output whose recorded local path still exists
    (outputs of an in-process chain); pulled outputs carry their upstream in ``lineage.json``."""
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
    """Every training stage's curves upstream of ``directories`` (and theirs), deduplicated by output."""
    entries: dict[str, dict[str, Any]] = {}
    for directory in lineage(directories):
        entries[f"path:{directory.resolve()}"] = _local_entry(directory)
        for md5, entry in read_lineage(directory).get("upstream", {}).items():
            entries.setdefault(md5, entry)
    curves: Curves = {}
    for entry in entries.values():
        for name, points in _entry_curves(entry).items():
            # The same output reached twice (on disk and through a lineage record) counts once.
            merged = dict(curves.get(name, []))
            merged.update(dict(points))
            curves[name] = sorted(merged.items())
    return curves
