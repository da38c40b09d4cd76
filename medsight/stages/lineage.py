"""Lineage as versions: what every stage output records about where it came from.

Each stage output carries ``lineage.json``, written by the runner before the stage computes:

- ``run``: the pipeline run id (``KFP_RUN_ID``, or ``MEDSIGHT_RUN_ID`` of an in-process chain),
  the code version (git commit), the ablation
  variant and the MLflow run id of the stage;
- ``inputs``: ``{name: {md5, stage, store_uri?}}``: DVC content hashes, never a temporary path;
- ``upstream``: ``{md5: {stage, run, inputs, metrics, history}}`` for every output upstream of
  this one, carried forward from the inputs' own ``lineage.json``. Training curves and
  validation values therefore travel with the outputs: an evaluation inside a KFP workspace,
  whose inputs' inputs were never on its disk, still sees every training stage's curve.

Histories are thinned to at most ``MAX_POINTS`` points per series so the record stays small at
paper scale.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import medsight

LINEAGE_FILE = "lineage.json"
RUN_ID_ENV = "KFP_RUN_ID"  # set by KFP (pod label) and by the local runner
CHAIN_RUN_ID_ENV = "MEDSIGHT_RUN_ID"  # set by `medsight chain`
COMMIT_ENV = "MEDSIGHT_GIT_COMMIT"
VARIANT_ENV = "MEDSIGHT_VARIANT"
MAX_POINTS = 400
_HISTORY = "history.jsonl"
_METRICS = "metrics.json"
_STAGE = "stage.json"


def git_commit() -> str:
    """The code version: MEDSIGHT_GIT_COMMIT (baked into images, set by the local runner), else git."""
    commit = os.environ.get(COMMIT_ENV)
    if commit:
        return commit
    repo = Path(medsight.__file__).resolve().parents[1]
    try:
        result = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def pipeline_run_id() -> str:
    """The run a stage belongs to: the KFP run, else the in-process chain's run, else none."""
    return os.environ.get(RUN_ID_ENV) or os.environ.get(CHAIN_RUN_ID_ENV, "")


def user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the UID (some pods)
        return "unknown"


@dataclass(frozen=True)
class RunInfo:
    """Which run produced an output; every field is a version, never a path."""

    run_id: str = ""
    git_commit: str = ""
    variant: str = ""
    mlflow_run_id: str = ""

    @classmethod
    def from_env(cls, mlflow_run_id: str = "") -> RunInfo:
        return cls(pipeline_run_id(), git_commit(), os.environ.get(VARIANT_ENV, ""), mlflow_run_id)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_lineage(directory: Path) -> dict[str, Any]:
    """The ``lineage.json`` of a stage output ({} when it has none: an older output, a dataset)."""
    found = _read_json(Path(directory) / LINEAGE_FILE)
    return found if isinstance(found, dict) else {}


def thin(points: list[list[float]], limit: int = MAX_POINTS) -> list[list[float]]:
    """At most ``limit`` points, evenly spread, the first and the last always kept."""
    if len(points) <= limit:
        return points
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def read_history(directory: Path) -> dict[str, list[list[float]]]:
    """``history.jsonl`` as series -> [[step, value], ...] (torn or non-finite lines skipped)."""
    path = Path(directory) / _HISTORY
    series: dict[str, list[list[float]]] = {}
    if not path.is_file():
        return series
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append([float(step), float(value)])
    return {name: thin(points) for name, points in series.items()}


def output_summary(directory: Path, md5: str) -> dict[str, Any]:
    """One upstream entry: the output's stage, run, inputs (md5s), final metrics and curves."""
    directory = Path(directory)
    record = _read_json(directory / _STAGE) or {}
    own = read_lineage(directory)
    metrics = _read_json(directory / _METRICS) or {}
    return {
        "md5": md5,
        "stage": record.get("stage") or own.get("stage", ""),
        "run": own.get("run", {}),
        "inputs": {name: entry.get("md5", "") for name, entry in own.get("inputs", {}).items()},
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        "history": read_history(directory),
    }


def build_lineage(
    stage: str,
    inputs: Mapping[str, Path],
    hashes: Mapping[str, str],
    run: RunInfo,
    store_uris: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The lineage document of a new output of ``stage`` from ``inputs`` (md5s in ``hashes``)."""
    upstream: dict[str, dict[str, Any]] = {}
    recorded: dict[str, dict[str, str]] = {}
    for name, path in sorted(inputs.items()):
        summary = output_summary(path, hashes[name])
        for md5, entry in read_lineage(path).get("upstream", {}).items():
            upstream.setdefault(md5, entry)
        upstream[hashes[name]] = summary
        recorded[name] = {"md5": hashes[name], "stage": summary["stage"]}
        if store_uris and store_uris.get(name):
            recorded[name]["store_uri"] = store_uris[name]
    return {"stage": stage, "run": run.to_dict(), "inputs": recorded, "upstream": upstream,
            "medsight_version": medsight.__version__}


def write_lineage(directory: Path, lineage: Mapping[str, Any]) -> None:
    from medsight.io_utils import atomic_write_json

    atomic_write_json(Path(directory) / LINEAGE_FILE, dict(lineage))


def recorded_input(directory: Path, name: str) -> dict[str, str] | None:
    """What an output records about its input ``name``: {md5, stage, path?, store_uri?} or None.

    Reads ``stage.json`` (older outputs stored a bare path there) and falls back to ``lineage.json``.
    """
    path = Path(directory) / _STAGE
    record: Any = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            # A damaged record must not read as "no input recorded": say which file is broken.
            raise ValueError(f"{path}: invalid JSON ({error.msg}, line {error.lineno}); rerun the stage that "
                             "wrote it or pull it again") from None
    entry = record.get("inputs", {}).get(name) if isinstance(record, dict) else None
    if isinstance(entry, str):
        return {"path": entry}
    if isinstance(entry, dict):
        return {k: str(v) for k, v in entry.items()}
    entry = read_lineage(directory).get("inputs", {}).get(name)
    return {k: str(v) for k, v in entry.items()} if isinstance(entry, dict) else None
