"""What a registered model version records about itself: the evaluation gate it passed and its
lineage (orchestrator run, code version, DVC md5 of every input and checkpoint, evaluation).

Used by ``medsight.platform.model_registry``; the pure parts (thresholds, tags) carry no MLflow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsight.platform.tracking import git_commit

# Headline evaluation metrics copied into the version tags (all of metrics.json goes into the run).
SUMMARY_METRICS = ("seg_dice", "closed_accuracy", "open_recall", "mecovqa_dice", "box_miou", "mc_accuracy", "diagnosis_recall")


class RegistryError(RuntimeError):
    """A registry request cannot be done (unknown model/version, bad threshold, no store)."""


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checked: dict[str, tuple[float, float]]  # metric -> (value, threshold)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rows = [f"{k} {v:.4f} {'>=' if v >= t else '<'} {t:.4f}" for k, (v, t) in self.checked.items()]
        return "; ".join(rows) or "no thresholds"



def parse_thresholds(pairs: list[str] | Mapping[str, Any] | None) -> dict[str, float]:
    """``["seg_dice=0.5", ...]`` or ``{"seg_dice": 0.5}`` -> {metric: minimum}."""
    if not pairs:
        return {}
    items = pairs.items() if isinstance(pairs, Mapping) else [p.split("=", 1) if "=" in p else (p, None) for p in pairs]
    thresholds = {}
    for key, value in items:
        try:
            thresholds[str(key).strip()] = float(value)
        except (TypeError, ValueError):
            raise RegistryError(f"threshold {key!r}: expected METRIC=NUMBER (e.g. seg_dice=0.5), got {value!r}") from None
    return thresholds


def check_thresholds(metrics: Mapping[str, float], thresholds: Mapping[str, float]) -> GateResult:
    """Every threshold metric must exist (a typo must not pass silently) and be >= its minimum."""
    unknown = sorted(k for k in thresholds if k not in metrics)
    if unknown:
        near = ", ".join(sorted(k for k in metrics if "." not in k))
        raise RegistryError(f"threshold metric(s) {', '.join(unknown)} not in the evaluation metrics; top-level metrics are: {near}")
    checked = {k: (float(metrics[k]), float(t)) for k, t in thresholds.items()}
    failures = [f"{k} = {v:.4f} is below the threshold {t:.4f}" for k, (v, t) in checked.items() if v < t]
    return GateResult(not failures, checked, failures)


def dvc_hash(directory: Path) -> str:
    """The md5 DVC records for a directory (``<md5>.dir``), computed without a DVC repo."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    _, _, obj = build(HashFileDB(MemoryFileSystem(), "/medsight-odb"), str(Path(directory).resolve()), LocalFileSystem(), "md5")
    return obj.hash_info.value


def upstream_outputs(*outputs: Path) -> dict[str, Path]:
    """Stage name -> directory for ``outputs`` and every stage output their ``stage.json``
    inputs lead to (the whole chain: data, base, every checkpoint, evaluation)."""
    found: dict[str, Path] = {}
    pending = [Path(o) for o in outputs]
    while pending:
        directory = pending.pop()
        record_file = directory / "stage.json"
        if not record_file.is_file():
            continue
        record = json.loads(record_file.read_text())
        name = record.get("stage", directory.parent.name)
        if name in found:
            continue
        found[name] = directory
        # Inputs are recorded as {md5, stage, path?} (older outputs: a bare path).
        paths = [entry if isinstance(entry, str) else entry.get("path", "") for entry in record.get("inputs", {}).values()]
        pending += [Path(p) for p in paths if p and Path(p).is_dir()]
    return found


def collect_lineage(evaluate_dir: Path, model_dir: Path, base_dir: Path, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Lineage of a model: what the pipeline passed in ``given`` wins; the rest is found on disk.

    ``given`` keys: ``kfp_run_id``, ``git_commit``, ``dvc`` ({name: md5} of inputs/checkpoints,
    as the pipeline's DVC refs know them). Directories the pipeline did not hash are hashed here.
    """
    given = dict(given or {})
    dvc = {str(k): str(v) for k, v in (given.get("dvc") or {}).items()}
    outputs = upstream_outputs(Path(evaluate_dir), Path(model_dir), Path(base_dir))
    known = {p.resolve() for p in outputs.values()}
    for label, directory in (("model", Path(model_dir)), ("base", Path(base_dir))):
        if directory.resolve() not in known:  # imported, not produced by a stage
            outputs[label] = directory
    for name, directory in sorted(outputs.items()):
        if name not in dvc:
            dvc[name] = dvc_hash(directory)
    fingerprints = {}
    for name, directory in outputs.items():
        record = directory / "stage.json"
        if record.is_file():
            fingerprints[name] = json.loads(record.read_text()).get("fingerprint", "")
    return {
        "kfp_run_id": given.get("kfp_run_id") or os.environ.get("KFP_RUN_ID") or "local",
        "git_commit": given.get("git_commit") or git_commit(),
        "dvc": dict(sorted(dvc.items())),
        "stage_fingerprints": dict(sorted(fingerprints.items())),
    }


def lineage_tags(lineage: Mapping[str, Any], evaluation: Mapping[str, float], gate: GateResult | None = None) -> dict[str, str]:
    tags = {"kfp.run_id": str(lineage.get("kfp_run_id", "local")), "git.commit": str(lineage.get("git_commit", "unknown"))}
    tags.update({f"dvc.{name}": str(md5) for name, md5 in (lineage.get("dvc") or {}).items()})
    tags.update({f"eval.{k}": f"{float(evaluation[k]):.6g}" for k in SUMMARY_METRICS if k in evaluation})
    if gate is not None:
        tags.update({f"gate.{k}": f">= {t:g}" for k, (_, t) in gate.checked.items()})
    return tags
