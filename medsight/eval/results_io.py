"""Evaluation results on disk: ``results.json`` (metrics) and ``predictions.jsonl`` (per sample).

``results.json`` is the single source for tables, the report and the comparison of ablations:
``{"benchmarks": {name: {"source", "n", "seconds", "samples_per_second", "skipped": [{id,
reason}], "metrics": {metric: {per_modality, counts, macro, micro, n}}}}, "run": {...}}``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from medsight.eval.runner import BenchmarkResult
from medsight.eval.tables import Summaries
from medsight.io_utils import atomic_path, atomic_write_json, read_json


def results_document(results: list[BenchmarkResult], run: dict[str, Any]) -> dict[str, Any]:
    benchmarks = {}
    for result in results:
        benchmarks[result.name] = {
            "source": result.source,
            "n": len(result.results),
            "seconds": round(result.seconds, 3),
            "samples_per_second": round(result.samples_per_second, 3),
            "skipped": [{"id": s.sample_id, "reason": s.reason} for s in result.skipped],
            "metrics": {name: summary.to_dict() for name, summary in result.metrics.items()},
        }
    return {"benchmarks": benchmarks, "run": run}


def summaries_from(document: dict[str, Any]) -> Summaries:
    return {name: entry["metrics"] for name, entry in document.get("benchmarks", {}).items()}


def write_results(path: Path, document: dict[str, Any]) -> None:
    atomic_write_json(Path(path), document)


def read_results(path: Path) -> dict[str, Any]:
    return read_json(path, ValueError, "no results.json here; run `medsight stage run evaluate` (or `medsight chain`) first")


def write_predictions(path: Path, results: list[BenchmarkResult]) -> None:
    """One line per evaluated sample: question, ground truth, answer, region tokens, scores."""
    with atomic_path(Path(path)) as tmp, tmp.open("w") as handle:
        for result in results:
            for item in result.results:
                sample = item.sample
                record = {
                    "benchmark": result.name,
                    "id": sample.sample_id,
                    "modality": sample.modality,
                    "task": sample.task,
                    "question": sample.question,
                    "ground_truth": sample.answer,
                    "prediction": item.prediction,
                    "region_tokens": item.region_tokens,
                    "pred_boxes": [list(b) for b in item.pred_boxes],
                    "scores": item.scores,
                }
                handle.write(json.dumps(record) + "\n")


def flat_metrics(document: dict[str, Any]) -> dict[str, float]:
    """``benchmark.metric.{macro,micro}`` plus per-modality values, for MLflow and stage outputs."""
    flat: dict[str, float] = {}
    for name, entry in document.get("benchmarks", {}).items():
        for metric, summary in entry["metrics"].items():
            flat[f"{name}.{metric}.macro"] = summary["macro"]
            flat[f"{name}.{metric}.micro"] = summary["micro"]
            for modality, value in summary["per_modality"].items():
                # MLflow metric names allow only letters, digits and _-. /: keep modality names safe.
                flat[f"{name}.{metric}.{re.sub(r'[^A-Za-z0-9_.-]+', '_', modality)}"] = value
        flat[f"{name}.samples_per_second"] = entry["samples_per_second"]
        flat[f"{name}.skipped"] = float(len(entry["skipped"]))
    return flat
