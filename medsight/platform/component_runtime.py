"""What the KFP stage components run: restore-or-run a stage against the S3 store, and report it.

A component (generated from the registry, ``components/``) receives its inputs as typed KFP
artifacts whose metadata holds the DVC hash of an upstream output, and runs
``medsight stage run NAME --store`` in a child process, which

1. resolves the config (preset + the overrides relevant to this stage),
2. computes the stage's cache key (config view + input hashes + code, ``stages/cache_key.py``),
3. restores the output from the store's run-cache, or pulls the inputs, runs the stage, pushes
   the output to the DVC remote and records it in the run-cache,
4. records lineage for the run and writes a small result file,

and the component (``kfp_component.py``) turns that result into its output artifact (DVC pointer
+ metadata), its Metrics artifact and a stage card (HTML). The child process keeps the KFP
executor light and is the same command a user runs by hand.

Connection settings come from the environment only (Kubernetes Secret/ConfigMap, or the local
runner): ``MEDSIGHT_S3_ENDPOINT``, ``AWS_*``, ``MEDSIGHT_STORE_URL``, ``MLFLOW_TRACKING_URI``,
``KFP_RUN_ID``. None of them is a component parameter, so none changes a KFP cache key.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsight.platform.artifacts import ArtifactRef, ArtifactStore, ArtifactStoreError
from medsight.platform.launched_stage import compute_stage
from medsight.train.progress_events import append_event

WORK_DIR_ENV = "MEDSIGHT_WORK_DIR"
NPROC_ENV = "MEDSIGHT_NPROC_PER_NODE"  # ranks in a GPU stage's pod, set per stage at compile time
FORCE_ENV = "MEDSIGHT_FORCE_RERUN"  # comma-separated stage names, or "all"
TRACK_HITS_ENV = "MEDSIGHT_TRACK_CACHE_HITS"  # "1": also open an MLflow run for restored stages
# Log these output files to MLflow: reports anywhere, images only from visual folders (mask
# overlays, plots) so a dataset's own images and any weights are never copied.
_REPORT_SUFFIXES = {".html", ".md"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".svg"}
_VISUAL_DIRS = ("overlay", "report", "plot", "figure", "curve")
_ARTIFACT_MAX_BYTES = 5 * 2**20


def resolve_config(preset: str, overrides: Sequence[str] | str | None = None) -> Any:
    from medsight.config import apply_overrides, get_preset

    if isinstance(overrides, str):
        overrides = json.loads(overrides) if overrides.strip().startswith("[") else [o for o in overrides.split(",") if o]
    return apply_overrides(get_preset(preset), list(overrides or []))


@dataclass
class StageResult:
    stage: str
    ref: ArtifactRef
    cached: bool
    metrics: dict[str, float]
    seconds: float  # stage compute (0 on a cache hit)
    wall_seconds: float  # whole process incl. pulls/pushes/tracking
    inputs: dict[str, str] = field(default_factory=dict)
    cache_key: str = ""
    mlflow_run_id: str | None = None

    def record(self, run_id: str) -> dict[str, Any]:
        from medsight.stages.lineage import VARIANT_ENV, git_commit

        return {
            "run_id": run_id,
            "stage": self.stage,
            "ref": json.loads(self.ref.to_json()),
            "cached": self.cached,
            "metrics": self.metrics,
            "seconds": round(self.seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "inputs": self.inputs,
            "cache_key": self.cache_key,
            "mlflow_run_id": self.mlflow_run_id,
            "git_commit": git_commit(),
            "variant": os.environ.get(VARIANT_ENV, ""),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _process_age() -> float:
    """Seconds since this process started (includes interpreter + import time)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # psutil missing: fall back to our own clock only
        return 0.0


def _event(**payload: Any) -> None:
    append_event(payload)


def _forced(stage: str) -> bool:
    wanted = {s.strip() for s in os.environ.get(FORCE_ENV, "").split(",") if s.strip()}
    return stage in wanted or "all" in wanted


def _make_tracker(stage: str, config: Any, tags: dict[str, str], background: bool = False) -> Any:
    from medsight.platform.tracking import MLflowTracker, resolve_tracking_uri
    from medsight.train.tracker import NullTracker

    if not resolve_tracking_uri(config):
        return NullTracker()
    if background:
        from medsight.platform.tracking_process import TrackerProcess

        return TrackerProcess(stage, config, tags=tags)
    return MLflowTracker.from_env(stage=stage, config=config, tags=tags)


def _log_output_files(tracker: Any, output: Path) -> None:
    for name in ("metrics.json", "stage.json", "config.yaml"):
        if (output / name).is_file():
            tracker.log_artifact(output / name, "stage")
    shown = 0
    for path in sorted(output.rglob("*")):
        if shown >= 100:
            break
        suffix = path.suffix.lower()
        parent_text = path.parent.relative_to(output).as_posix().lower()
        visual = suffix in _IMAGE_SUFFIXES and any(word in parent_text for word in _VISUAL_DIRS)
        if path.is_file() and (suffix in _REPORT_SUFFIXES or visual) and path.stat().st_size <= _ARTIFACT_MAX_BYTES:
            parent = path.parent.relative_to(output).as_posix()
            tracker.log_artifact(path, "outputs" + ("" if parent == "." else f"/{parent}"))
            shown += 1


def _close(tracker: Any, status: str = "FINISHED") -> None:
    close = getattr(tracker, "close", None)
    if close is not None:
        close(status)


def execute_stage(
    stage: str,
    inputs: Mapping[str, str],
    config: Any,
    *,
    store: ArtifactStore | None = None,
    use_existing: str = "",
    run_id: str | None = None,
    restore_only: bool = False,
    nproc: str = "1",
    compute: bool = True,
) -> StageResult | None:
    """Restore ``stage`` from the run-cache or run it, push its output, track it, record lineage.

    ``inputs``: input name -> a DVC reference (JSON ref, ``<md5>.dir`` or ``run:<id>/<stage>``);
    "" means left out by the variant. ``restore_only``: return None instead of running on a miss
    (the KFP component checks the cache before it starts a stage process). ``nproc``: ranks on
    this node (a number or ``auto``); in a multi-node job every node calls this, and only the
    first one pushes and records (the others return None). ``compute=False``: only restore, even
    when the stage is forced (None when the run-cache lacks it), e.g. for the component that
    waited on a multi-node TrainJob.
    """
    from medsight.stages.cache_key import stage_key
    from medsight.stages.registry import get_stage

    started = time.time()
    age_at_start = _process_age()
    spec = get_stage(stage)
    store = store or ArtifactStore()
    store.ensure_ready()
    run_id = run_id or os.environ.get("KFP_RUN_ID") or time.strftime("adhoc-%Y%m%d-%H%M%S")

    unknown = sorted(set(inputs) - set(spec.input_names))
    if unknown:
        raise ArtifactStoreError(f"stage {stage}: unknown input {unknown[0]!r}; it takes {', '.join(spec.input_names) or 'none'}")
    refs: dict[str, ArtifactRef] = {}
    for name, text in inputs.items():
        ref = store.resolve(text)
        if ref is not None:
            refs[name] = ref
    for name in spec.required_inputs:
        if name not in refs:
            raise ArtifactStoreError(
                f"stage {stage} needs input {name!r} (the output of {spec.inputs[name].source}) but it was "
                "absent; a variant that drops that stage cannot run this one"
            )
    key = stage_key(spec, config, {name: ref.md5 for name, ref in refs.items()})
    base_tags = {**{f"dvc.{name}": ref.md5 for name, ref in refs.items()}, "medsight.cache_key": key.key}

    if use_existing:
        # A registered version (e.g. a dataset revision) stands in for this stage's output.
        existing = store.resolve(use_existing)
        if existing is None or not store.in_remote(existing):
            raise ArtifactStoreError(f"stage {stage}: {use_existing!r} is not in the DVC remote {store.config.dvc_url}")
        entry: dict[str, Any] | None = {"ref": json.loads(existing.to_json()), "metrics": {}, "mlflow_run_id": None}
    else:
        entry = None if _forced(stage) and compute else store.cache_lookup(stage, key.key)
    if entry is None and restore_only:
        return None
    _event(event="start", stage=stage, run_id=run_id)

    if entry is not None:
        ref = ArtifactRef.parse(json.dumps(entry["ref"]))
        assert ref is not None
        metrics = {k: float(v) for k, v in entry.get("metrics", {}).items()}
        mlflow_run_id = entry.get("mlflow_run_id")
        if os.environ.get(TRACK_HITS_ENV, "") not in ("", "0", "false"):
            # Off by default: importing MLflow costs seconds, and the run that computed this
            # output (linked from the lineage record) already holds its params, curves and tags.
            tracker = _make_tracker(stage, config, {
                **base_tags, "dvc.output": ref.md5, "medsight.cache_hit": "true",
                "medsight.source_mlflow_run_id": str(mlflow_run_id or ""),
            })
            tracker.log_metrics(metrics)
            _close(tracker)
        result = StageResult(stage, ref, True, metrics, 0.0, 0.0, {k: r.md5 for k, r in refs.items()}, key.key,
                             mlflow_run_id)
    elif not compute:
        return None
    else:
        result = _run_and_push(stage, config, refs, store, key.key, base_tags, nproc)
        if result is None:
            _event(event="end", stage=stage, run_id=run_id, node_rank="other")
            return None
    result.wall_seconds = time.time() - started + age_at_start
    store.record_lineage(run_id, result.record(run_id))
    _event(event="end", stage=stage, run_id=run_id, cached=result.cached, seconds=result.seconds,
           wall_seconds=result.wall_seconds, md5=result.ref.md5)
    return result


def _run_and_push(
    stage: str, config: Any, refs: dict[str, ArtifactRef], store: ArtifactStore, key: str, base_tags: dict[str, str],
    nproc: str = "1",
) -> StageResult | None:
    from medsight.stages.registry import get_stage

    work_root = Path(os.environ.get(WORK_DIR_ENV) or tempfile.gettempdir())
    work_root.mkdir(parents=True, exist_ok=True)
    ws_dir = Path(tempfile.mkdtemp(prefix=f"{stage}-", dir=work_root))
    # Computed outside the (per-attempt) DVC workspace, at a path fixed by the cache key: a retry
    # after a crash or a killed rank resumes from the checkpoints the last attempt left there.
    computed = work_root / "medsight-stages" / f"{stage}-{key[:12]}"
    tracker: Any = None
    try:
        # Opened first, in a helper process: MLflow loads there while this one pulls the inputs
        # and imports the stage (tracking_process.py).
        tracker = _make_tracker(stage, config, {**base_tags, "medsight.cache_hit": "false"},
                                background=not get_stage(stage).uses_mlflow)
        with store.workspace(ws_dir) as ws:
            paths = ws.pull_many({f"in-{name}": ref for name, ref in refs.items()})
            paths = {name: paths[f"in-{name}"] for name in refs}
            compute_started = time.time()
            # The inputs' versions (DVC hashes, store URIs) go into stage.json, not these temp paths.
            store_uris = {name: store.object_uri(ref.md5) for name, ref in refs.items()}
            record, expected = compute_stage(stage, config, paths, computed, tracker, nproc, refs, store_uris)
            if record is None:
                _close(tracker)
                return None
            if record["key"] != (expected or key):
                raise ArtifactStoreError(f"stage {stage}: the pulled inputs hash differently from their references")
            output = ws_dir / stage
            os.replace(computed, output)
            metrics = json.loads((output / "metrics.json").read_text())
            seconds = time.time() - compute_started
            cacheable = record.get("cacheable", True)
            _log_output_files(tracker, output)
            ref = ws.add(output, stage=stage)
            ws.push(ref, stage)
            if get_stage(stage).output == "evaluation":
                _log_evaluated_model(tracker, paths, output, metrics)
        tracker.set_tags({"dvc.output": ref.md5})
        mlflow_run_id = getattr(tracker, "run_id", None)
        if cacheable:
            # Written only after a complete push: a hit always finds every object in the remote.
            store.cache_record(stage, key, {
                "stage": stage, "ref": json.loads(ref.to_json()), "metrics": metrics, "seconds": round(seconds, 3),
                "mlflow_run_id": mlflow_run_id, "kfp_run_id": os.environ.get("KFP_RUN_ID", ""),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
    except BaseException:
        if tracker is not None:
            _close(tracker, "FAILED")
        raise
    finally:
        shutil.rmtree(ws_dir, ignore_errors=True)
    _close(tracker)
    return StageResult(stage, ref, False, metrics, seconds, 0.0, {k: r.md5 for k, r in refs.items()}, key, mlflow_run_id)


def _log_evaluated_model(tracker: Any, inputs: Mapping[str, Path], output: Path, metrics: Mapping[str, float]) -> None:
    """The model the evaluation scored, logged as an MLflow model of its run (final_model.py).

    Called once the evaluation is pushed: a tracking failure is reported (stderr and a run tag),
    never a reason to lose the evaluation."""
    run_id = getattr(tracker, "run_id", None)
    if not run_id or "model" not in inputs or "base" not in inputs:
        return
    from medsight.stages.lineage import read_lineage

    try:
        # By whichever process holds the run (a helper has MLflow loaded already).
        tracker.log_final_model(inputs["model"], inputs["base"], read_lineage(output), metrics)
    except Exception as error:  # noqa: BLE001 - see the docstring
        print(f"warning: the evaluated model was not logged to MLflow: {error}", file=sys.stderr)
        tracker.set_tags({"medsight.final_model_error": str(error)[:500]})


def outcome(result: StageResult) -> dict[str, Any]:
    return {"stage": result.stage, "ref": json.loads(result.ref.to_json()), "cached": result.cached,
            "metrics": result.metrics, "seconds": result.seconds, "cache_key": result.cache_key,
            "inputs": result.inputs}
