"""Run one stage safely: check inputs and output, key it, reuse or compute, swap the output in.

``stage.json`` is written last, so its presence means the output is complete. It records the
cache key and what went into it (config view, input content hashes, code hash), the files the
stage wrote, and where the inputs came from.

The runner never deletes what it did not write. An output folder that is an input (or inside
one, or holds one) is refused; so is one that holds files no stage wrote. A stage computes into
a working folder beside its output (``.<out>.<key>.partial``, where a crashed attempt resumes
from its checkpoints) and the finished folder replaces the previous output only when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import medsight
from medsight.config.access import outside, recorded_reads
from medsight.config.io import save_config
from medsight.config.schema import ExperimentConfig
from medsight.io_utils import atomic_write_json, ensure_writable_dir, missing_reason, replace_directory
from medsight.stages.cache_key import CacheKey, stage_key
from medsight.stages.content_hash import input_hashes
from medsight.stages.lineage import RunInfo, build_lineage, write_lineage
from medsight.stages.registry import StageSpec, get_stage
from medsight.train.tracker import HistoryRecorder, NullTracker, Tracker

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"  # medsight.train.checkpoint.CHECKPOINTS_DIR


class StageError(ValueError):
    """A stage cannot run as asked (bad input, unsafe output); the message names the path."""


@dataclass(frozen=True)
class StagePlan:
    """What will run: the stage, its inputs, their content hashes and the resulting cache key."""

    spec: StageSpec
    config: ExperimentConfig
    inputs: dict[str, Path]
    hashes: dict[str, str]
    key: CacheKey


@dataclass(frozen=True)
class StageRun:
    metrics: dict[str, float]
    reused: bool
    key: CacheKey
    output: Path


def read_stage_file(directory: Path) -> dict[str, Any] | None:
    """The ``stage.json`` of a completed stage output, None when there is none."""
    path = Path(directory) / STAGE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StageError(f"{path}: unreadable stage record ({error}); move the folder away and rerun") from error
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        raise StageError(f"{path}: not a stage record (no 'key'); move the folder away and rerun")
    return record


def validate_inputs(spec: StageSpec, inputs: dict[str, Path]) -> None:
    unknown = sorted(set(inputs) - set(spec.input_names))
    if unknown:
        raise StageError(f"stage {spec.name}: unknown input {unknown[0]!r}; it takes {', '.join(spec.input_names) or 'no inputs'}")
    missing = [name for name in spec.required_inputs if name not in inputs]
    if missing:
        raise StageError(f"stage {spec.name}: missing input {missing[0]!r} (pass --input {missing[0]}=DIR)")
    for name, path in inputs.items():
        path = Path(path)
        if not path.is_dir():
            what = "is not a directory" if path.exists() else missing_reason(path)
            raise StageError(f"stage {spec.name}: input {name}={path} {what}")
        if (path / CONFIG_FILE).is_file() and not (path / STAGE_FILE).is_file():
            # A stage output without stage.json is one that crashed or is still running.
            raise StageError(
                f"stage {spec.name}: input {name}={path} is an unfinished stage output (no {STAGE_FILE}); "
                "rerun that stage first (it resumes from its last checkpoint)"
            )


def plan_stage(name: str, config: ExperimentConfig, inputs: dict[str, Path]) -> StagePlan:
    """Validate the inputs and compute the cache key (inputs hashed by content, stat-indexed).

    In a multi-process job rank 0 hashes the inputs and the other ranks take its hashes."""
    from medsight.train import distributed  # torch: only when a stage is planned, not for lookups

    spec = get_stage(name)
    inputs = {key: Path(value) for key, value in inputs.items()}
    validate_inputs(spec, inputs)
    hashes = distributed.broadcast_from_main(input_hashes(inputs) if distributed.is_main() else None)
    return StagePlan(spec, config, inputs, hashes, stage_key(spec, config, hashes))


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(plan: StagePlan, output: Path) -> dict[str, Any] | None:
    """Refuse an unsafe output folder; return the stage record it already holds, if any."""
    target = Path(output).resolve()
    for name, path in plan.inputs.items():
        if _related(target, path.resolve()):
            raise StageError(
                f"--out {output} overlaps input {name}={path}; writing there could destroy the input. "
                "Choose an output folder outside every input"
            )
    if target.exists() and not target.is_dir():
        raise StageError(f"--out {output} exists and is not a folder")
    if not target.exists() or not any(target.iterdir()):
        return None
    record = read_stage_file(target)
    if record is None:
        raise StageError(
            f"--out {output} holds files that no stage wrote (no {STAGE_FILE}); refusing to write into it. "
            "Choose an empty or new folder"
        )
    if record.get("stage") != plan.spec.name:
        raise StageError(
            f"--out {output} holds the output of stage {record.get('stage')!r}, not {plan.spec.name}; choose another folder"
        )
    written = set(record.get("files", []))
    foreign = sorted(
        p.relative_to(target).as_posix() for p in target.rglob("*")
        if p.is_file() and p.relative_to(target).as_posix() not in written | {STAGE_FILE}
    )
    if foreign:
        raise StageError(
            f"--out {output} holds files the stage did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); move them away, then rerun"
        )
    return record


def _work_dir(output: Path, key: CacheKey) -> Path:
    """Deterministic per key, so a rerun after a crash finds (and resumes from) its checkpoints."""
    output = Path(output)
    return output.parent / f".{output.name}.{key.short}.partial"


def _written_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def run_stage(
    name: str,
    config: ExperimentConfig,
    inputs: dict[str, Path],
    output: Path,
    tracker: Tracker | None = None,
    reuse: bool = True,
    plan: StagePlan | None = None,
    store_uris: dict[str, str] | None = None,
    restart: bool = False,
) -> StageRun:
    """Reuse ``output`` when it holds this key's result (and ``reuse``), else compute and swap in.

    ``store_uris``: where each input lives in the DVC store, when the inputs were pulled from it
    (their local folders are then temporary and are not recorded).
    ``restart``: discard what a crashed attempt left (its checkpoints), and start clean.
    Under a multi-process launcher (torchrun) every rank calls this; the ranks join one process
    group, compute together, and rank 0 alone writes the config, metrics, ``stage.json`` and
    tracking records, and swaps the output in.
    """
    from medsight.train import distributed

    with distributed.process_group():
        return _run_stage(name, config, inputs, output, tracker, reuse, plan, store_uris, restart)


def _run_stage(
    name: str,
    config: ExperimentConfig,
    inputs: dict[str, Path],
    output: Path,
    tracker: Tracker | None,
    reuse: bool,
    plan: StagePlan | None,
    store_uris: dict[str, str] | None,
    restart: bool,
) -> StageRun:
    from medsight.train import distributed

    plan = plan or plan_stage(name, config, inputs)
    if distributed.world_size() > 1 and not plan.spec.gpu:
        raise StageError(f"stage {name} runs in one process (resource class 'cpu'); run it without --nproc-per-node")
    output = Path(output)
    previous = check_output(plan, output)
    ensure_writable_dir(output, "--out")  # below a file, read-only: said now, not after the work
    if reuse and previous is not None and previous["key"] == plan.key.key and previous.get("cacheable", True):
        metrics = json.loads((output / METRICS_FILE).read_text())
        return StageRun(metrics, True, plan.key, output)

    work = _work_dir(output, plan.key)
    if distributed.is_main() and restart:
        shutil.rmtree(work, ignore_errors=True)
    resuming = work.exists()
    try:
        if distributed.is_main():
            work.mkdir(parents=True, exist_ok=True)
        return _compute(plan, config, output, work, tracker, name, store_uris)
    except BaseException:
        # Keep a working folder with checkpoints (the rerun resumes there); one that holds nothing
        # to resume from (bad data found while loading, say) would only be clutter beside --out.
        if (distributed.is_main() and not resuming and not (work / CHECKPOINTS_DIR).exists()
                and not (work / STAGE_FILE).exists()):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _compute(plan: StagePlan, config: ExperimentConfig, output: Path, work: Path, tracker: Tracker | None,
             name: str, store_uris: dict[str, str] | None) -> StageRun:
    from medsight.train import distributed

    main = distributed.is_main()
    # The stage's module (torch, its models) is imported before the tracker is first asked for its
    # run id: a tracker opening its run in another process gets that long to do so.
    stage_fn = plan.spec.load()
    lineage: dict = {}
    if main:
        save_config(config, work / CONFIG_FILE)
        # Written before the stage computes: an evaluation reads it for its report's provenance and
        # for the curves of every upstream training stage, carried here from the inputs' lineage.
        lineage = build_lineage(name, plan.inputs, plan.hashes,
                                RunInfo.from_env(str(getattr(tracker, "run_id", "") or "")), store_uris)
        write_lineage(work, lineage)
        log_lineage = getattr(tracker, "log_lineage", None)
        if log_lineage is not None:
            log_lineage(lineage)
        # Curves land beside the checkpoint too, so the report works without an MLflow server.
        tracker = HistoryRecorder(tracker or NullTracker(), work)
        tracker.set_tags({"medsight.stage": name, "medsight.cache_key": plan.key.key,
                          "medsight.world_size": str(distributed.world_size()),
                          **{f"dvc.{input_name}": md5 for input_name, md5 in plan.hashes.items()}})
    else:
        tracker = NullTracker()  # rank 0 alone tracks and writes
    distributed.barrier()
    started = time.perf_counter()
    with recorded_reads(config) as reads:
        metrics = stage_fn(config, plan.inputs, work, tracker)
    distributed.barrier()
    if not main:
        return StageRun({key: float(value) for key, value in metrics.items()}, False, plan.key, output)
    unkeyed = outside(reads, plan.spec.reads)
    if unkeyed:
        # The output may depend on settings its key does not hold: never reuse it.
        logger.warning("stage %s read config fields outside its view (medsight/stages/registry.py): %s; "
                       "its output will not be reused", name, ", ".join(unkeyed))
    elapsed = time.perf_counter() - started
    shutil.rmtree(work / CHECKPOINTS_DIR, ignore_errors=True)
    metrics = {key: float(value) for key, value in metrics.items()}
    tracker.log_metrics(metrics)
    atomic_write_json(work / METRICS_FILE, metrics)
    atomic_write_json(work / STAGE_FILE, {
        "stage": name,
        "key": plan.key.key,
        "cacheable": not unkeyed,
        "config_reads_outside_view": unkeyed,
        "config_reads": sorted(reads),
        "config_view": plan.key.material["config"],
        "code": plan.key.material["code"],
        # Inputs as versions (DVC hashes); a local path only when it is not a throw-away pull.
        "inputs": {input_name: {**entry, **({} if store_uris else {"path": str(plan.inputs[input_name])})}
                   for input_name, entry in lineage["inputs"].items()},
        "run": lineage["run"],
        "files": [*_written_files(work), STAGE_FILE],
        "medsight_version": medsight.__version__,
        "world_size": distributed.world_size(),
        "seconds": round(elapsed, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    output.parent.mkdir(parents=True, exist_ok=True)
    replace_directory(work, output)
    return StageRun(metrics, False, plan.key, output)
