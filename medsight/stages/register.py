"""After evaluation: register the evaluated model in the MLflow model registry, gated on thresholds.

The gate is ``register.thresholds`` ("metric=minimum" entries over the evaluation's metrics); a
model below it is not registered and the stage says why (metrics ``registered`` = 0). The
registered version is the self-contained serving package, tagged with its lineage: the KFP run,
the git commit and the DVC hash of every stage output upstream of the evaluation (carried in the
evaluation's ``lineage.json``). Without an MLflow tracking URI the stage records that it could not
register, rather than failing a run that has no registry to write to.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medsight.config.schema import ExperimentConfig
from medsight.io_utils import atomic_write_json
from medsight.train.tracker import Tracker

logger = logging.getLogger(__name__)


def parse_thresholds(entries: tuple[str, ...]) -> dict[str, float]:
    thresholds = {}
    for entry in entries:
        metric, _, value = entry.partition("=")
        try:
            thresholds[metric.strip()] = float(value)
        except ValueError:
            raise ValueError(f"register.thresholds: {entry!r} must look like metric=minimum, e.g. seg_dice=0.5") from None
    return thresholds


def upstream_hashes(lineage: dict) -> dict[str, str]:
    """Stage name -> DVC hash of every output the evaluation descends from (and its own inputs)."""
    found = {entry["stage"]: md5 for md5, entry in lineage.get("upstream", {}).items() if entry.get("stage")}
    for entry in lineage.get("inputs", {}).values():
        if entry.get("stage") and entry.get("md5"):
            found[entry["stage"]] = entry["md5"]
    return found


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    from medsight.platform.model_registry import register_from_evaluation
    from medsight.platform.tracking import resolve_tracking_uri
    from medsight.stages.lineage import git_commit, pipeline_run_id, read_lineage

    settings = config.register
    thresholds = parse_thresholds(settings.thresholds)
    record: dict = {"thresholds": thresholds, "model_name": settings.model_name}
    if not resolve_tracking_uri(None):
        record.update(registered=False, reason="no MLflow tracking URI (set MLFLOW_TRACKING_URI)")
        logger.warning("register: %s; the model was not registered", record["reason"])
    else:
        lineage = {"kfp_run_id": pipeline_run_id(), "git_commit": git_commit(),
                   "dvc": upstream_hashes(read_lineage(Path(inputs["evaluation"])))}
        registration = register_from_evaluation(
            Path(inputs["evaluation"]), Path(inputs["model"]), Path(inputs["base"]), thresholds, lineage,
            name=settings.model_name, alias=settings.alias or None, workdir=output,
        )
        record.update(registered=registration.registered, version=registration.version,
                      failures=list(registration.gate.failures), model_uri=registration.model_uri)
    atomic_write_json(output / "registration.json", record)
    return {"registered": float(bool(record["registered"]))}
