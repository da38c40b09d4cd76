"""What every KFP stage component runs: resolve config, restore-or-run, push, track, report.

A component receives its inputs as DVC references (JSON ``ArtifactRef`` strings, "" when an
ablation left the input out) and hands one reference downstream. Because references are
content hashes, KFP's own cache key is content-addressed too: a stage whose upstream was
recomputed to identical bytes is still a KFP cache hit on the cluster. Where KFP caching does
not apply (``kfp.local``, a changed but irrelevant parameter), the DVC run-cache does: a stage
with the same (config sections, input md5s, version) is restored from the remote, not rerun.

Connection settings come from the environment only (Kubernetes Secret/ConfigMap, or the local
runner): ``MEDSIGHT_S3_ENDPOINT``, ``AWS_*``, ``MEDSIGHT_STORE_URL``, ``MLFLOW_TRACKING_URI``,
``KFP_RUN_ID``. None of them is a component parameter, so none changes a KFP cache key.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsight.platform.artifacts import ArtifactRef, ArtifactStore, ArtifactStoreError, run_cache_key

WORK_DIR_ENV = "MEDSIGHT_WORK_DIR"
EVENTS_ENV = "MEDSIGHT_EVENTS_FILE"
FORCE_ENV = "MEDSIGHT_FORCE_RERUN"  # comma-separated stage names, or "all"
TRACK_HITS_ENV = "MEDSIGHT_TRACK_CACHE_HITS"  # "1": also open an MLflow run for restored stages

# Pipeline-level hyperparameters -> the config key each sets. A component only takes the ones
# whose key lies in its stage's config sections, so e.g. a codebook-size change leaves the KFP
# cache keys of synth-data, base-models, perceiver-pretrain and v2t-align untouched.
HPARAM_KEYS: dict[str, str] = {
    "codebook_size": "model.codebook.codes_per_modality",
    "two_way": "model.perceiver.two_way",
    "region_embeddings": "model.region_embeddings",
    "grounding_mode": "model.grounding",
}
# Log these output files to MLflow: reports anywhere, images only from visual folders (mask
# overlays, plots) so a dataset's own images and any weights are never copied.
_REPORT_SUFFIXES = {".html", ".md"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".svg"}
_VISUAL_DIRS = ("overlay", "report", "plot", "figure", "curve")
_ARTIFACT_MAX_BYTES = 5 * 2**20


def relevant_hparams(stage: str) -> tuple[str, ...]:
    from medsight.stages.registry import get_stage

    sections = get_stage(stage).config_sections
    return tuple(
        name for name, key in HPARAM_KEYS.items() if any(key == s or key.startswith(s + ".") for s in sections)
    )


def hparam_overrides(hparams: Mapping[str, Any]) -> list[str]:
    """Pipeline parameters as config overrides; 0 / "" mean "keep the preset's value"."""
    overrides = []
    for name, value in hparams.items():
        if name not in HPARAM_KEYS:
            raise ValueError(f"unknown pipeline hyperparameter {name!r}; known: {', '.join(HPARAM_KEYS)}")
        if value is None or value == "" or (name == "codebook_size" and int(value) <= 0):
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(int(value) if name == "codebook_size" else value)
        overrides.append(f"{HPARAM_KEYS[name]}={text}")
    return overrides


def resolve_config(preset: str, overrides: Sequence[str] | str | None, hparams: Mapping[str, Any] | None = None) -> Any:
    from medsight.config import apply_overrides, get_preset

    if isinstance(overrides, str):
        overrides = json.loads(overrides) if overrides.strip().startswith("[") else [o for o in overrides.split(",") if o]
    # Explicit overrides come last so they win over the named hyperparameters.
    return apply_overrides(get_preset(preset), hparam_overrides(hparams or {}) + list(overrides or []))


@dataclass
class StageResult:
    stage: str
    ref: ArtifactRef
    cached: bool
    metrics: dict[str, float]
    seconds: float  # stage compute (0 on a cache hit)
    wall_seconds: float  # whole component incl. pulls/pushes/tracking
    inputs: dict[str, str] = field(default_factory=dict)
    cache_key: str = ""
    mlflow_run_id: str | None = None

    def record(self, run_id: str) -> dict[str, Any]:
        from medsight.platform.tracking import git_commit

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
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a") as handle:  # one short line per write: appends do not interleave
            handle.write(json.dumps({"time": time.time(), **payload}) + "\n")


def _forced(stage: str) -> bool:
    wanted = {s.strip() for s in os.environ.get(FORCE_ENV, "").split(",") if s.strip()}
    return stage in wanted or "all" in wanted


def _make_tracker(stage: str, config: Any, tags: dict[str, str]) -> Any:
    from medsight.platform.tracking import MLflowTracker, resolve_tracking_uri
    from medsight.train.tracker import NullTracker

    if not resolve_tracking_uri(config):
        return NullTracker()
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
) -> StageResult:
    """Restore ``stage`` from the run-cache or run it, push its output, track it, record lineage."""
    from medsight.stages.chain import INPUT_SOURCES
    from medsight.stages.registry import get_stage

    started = time.time()
    age_at_start = _process_age()
    spec = get_stage(stage)
    store = store or ArtifactStore()
    store.ensure_ready()
    run_id = run_id or os.environ.get("KFP_RUN_ID") or time.strftime("adhoc-%Y%m%d-%H%M%S")
    _event(event="start", stage=stage, run_id=run_id)

    unknown = sorted(set(inputs) - set(spec.inputs))
    if unknown:
        raise ArtifactStoreError(f"stage {stage}: unknown input {unknown[0]!r}; it takes {', '.join(spec.inputs) or 'none'}")
    refs: dict[str, ArtifactRef] = {}
    for name, text in inputs.items():
        ref = store.resolve(text)
        if ref is not None:
            refs[name] = ref
    for name in spec.required_inputs:
        if name not in refs:
            raise ArtifactStoreError(
                f"stage {stage} needs input {name!r} (the output of {INPUT_SOURCES.get(name, name)}) but it was "
                "absent; an ablation may have skipped it (e.g. skipping both t2v-align and instruct-tune leaves "
                "evaluate without a model)"
            )
    input_tags = {f"dvc.{name}": ref.md5 for name, ref in refs.items()}
    key, _material = run_cache_key(spec, config, refs)
    base_tags = {**input_tags, "medsight.cache_key": key}

    if use_existing:
        # A registered version (e.g. a dataset revision) stands in for this stage's output.
        existing = store.resolve(use_existing)
        if existing is None or not store.in_remote(existing):
            raise ArtifactStoreError(f"stage {stage}: {use_existing!r} is not in the DVC remote {store.config.dvc_url}")
        entry: dict[str, Any] | None = {"ref": json.loads(existing.to_json()), "metrics": {}, "mlflow_run_id": None}
    else:
        entry = None if _forced(stage) else store.cache_lookup(stage, key)

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
        result = StageResult(stage, ref, True, metrics, 0.0, 0.0, {k: r.md5 for k, r in refs.items()}, key,
                             mlflow_run_id)
    else:
        result = _run_and_push(stage, config, refs, store, key, base_tags)
    result.wall_seconds = time.time() - started + age_at_start
    store.record_lineage(run_id, result.record(run_id))
    _event(event="end", stage=stage, run_id=run_id, cached=result.cached, seconds=result.seconds,
           wall_seconds=result.wall_seconds, md5=result.ref.md5)
    return result


def _run_and_push(
    stage: str, config: Any, refs: dict[str, ArtifactRef], store: ArtifactStore, key: str, base_tags: dict[str, str]
) -> StageResult:
    from medsight.stages.runner import run_stage

    work_root = Path(os.environ.get(WORK_DIR_ENV) or tempfile.gettempdir())
    work_root.mkdir(parents=True, exist_ok=True)
    ws_dir = Path(tempfile.mkdtemp(prefix=f"{stage}-", dir=work_root))
    tracker: Any = None
    try:
        with store.workspace(ws_dir) as ws:
            paths = ws.pull_many({f"in-{name}": ref for name, ref in refs.items()})
            paths = {name: paths[f"in-{name}"] for name in refs}
            tracker = _make_tracker(stage, config, {**base_tags, "medsight.cache_hit": "false"})
            output = ws_dir / stage
            compute_started = time.time()
            metrics, _reused = run_stage(stage, config, paths, output, tracker, reuse=False)
            seconds = time.time() - compute_started
            _log_output_files(tracker, output)
            ref = ws.add(output, stage=stage)
            ws.push(ref, stage)
        tracker.set_tags({"dvc.output": ref.md5})
        mlflow_run_id = getattr(tracker, "run_id", None)
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


def run_component(
    stage: str,
    inputs: Mapping[str, str],
    *,
    preset: str,
    overrides: Sequence[str] | str | None = None,
    hparams: Mapping[str, Any] | None = None,
    use_existing: str = "",
    output: Any = None,
    metrics: Any = None,
    html: Any = None,
) -> tuple[str, bool]:
    """Entry point of the KFP components: returns (output reference JSON, was it a cache hit)."""
    from medsight.platform.fast_exit import install_for_kfp_executor

    install_for_kfp_executor()  # before the stage's heavy imports, so their exit handlers still run
    config = resolve_config(preset, overrides, hparams)
    result = execute_stage(stage, inputs, config, use_existing=use_existing)
    if output is not None:
        Path(output.path).parent.mkdir(parents=True, exist_ok=True)
        Path(output.path).write_text(result.ref.pointer(stage))
        output.metadata.update({
            "dvc_md5": result.ref.md5, "size": result.ref.size or 0, "nfiles": result.ref.nfiles or 0,
            "cached": result.cached, "stage": stage, "pull": f"medsight platform pull --md5 {result.ref.md5} --dest {stage}",
        })
    if metrics is not None:
        for name, value in result.metrics.items():
            metrics.log_metric(name, value)
        metrics.log_metric("cached", 1.0 if result.cached else 0.0)
        metrics.log_metric("stage_seconds", round(result.seconds, 3))
    if html is not None:
        _export_report(result.ref, Path(html.path))
    status = "restored from run-cache" if result.cached else f"ran in {result.seconds:.1f}s"
    print(f"[medsight] {stage}: {status}; output {result.ref.md5}", flush=True)
    return result.ref.to_json(), result.cached


def _pull_files(ref: ArtifactRef, patterns: Sequence[str]) -> dict[str, bytes]:
    """Read a few small files of a stored output (reports, metrics) without keeping a copy."""
    store = ArtifactStore()
    work_root = Path(os.environ.get(WORK_DIR_ENV) or tempfile.gettempdir())
    work_root.mkdir(parents=True, exist_ok=True)
    ws_dir = Path(tempfile.mkdtemp(prefix="read-", dir=work_root))
    try:
        with store.workspace(ws_dir) as ws:
            root = ws.pull(ref, "out")
            found: dict[str, bytes] = {}
            for pattern in patterns:
                for path in sorted(root.glob(pattern)):
                    found.setdefault(path.relative_to(root).as_posix(), path.read_bytes())
            return found
    finally:
        shutil.rmtree(ws_dir, ignore_errors=True)


def _export_report(ref: ArtifactRef, target: Path) -> None:
    files = _pull_files(ref, ["report.html", "**/*.html"])
    target.parent.mkdir(parents=True, exist_ok=True)
    if files:
        target.write_bytes(next(iter(files.values())))
    else:
        target.write_text(f"<p>No HTML report in output {ref.md5}.</p>")


def compare_evaluations(results: Sequence[str], table_path: str | None = None) -> str:
    """Markdown table: one row per ablation variant (JSON {name, evaluation ref}) and its metrics."""
    rows: list[tuple[str, dict[str, float], str]] = []
    for item in results:
        data = json.loads(item) if isinstance(item, str) else dict(item)
        ref = ArtifactRef.parse(data["evaluation"])
        if ref is None:
            rows.append((data["name"], {}, "-"))
            continue
        files = _pull_files(ref, ["metrics.json"])
        metrics = json.loads(files["metrics.json"]) if "metrics.json" in files else {}
        rows.append((data["name"], metrics, ref.short))
    from medsight.stages.registry import get_stage

    # Headline numbers only; every metric stays in each evaluation's metrics.json and MLflow run.
    headline = (*get_stage("evaluate").metrics, "comprehension_avg", "diagnosis_recall", "mecovqa_dice")
    keys = [k for k in dict.fromkeys(headline) if any(k in metrics for _, metrics, _ in rows)]
    lines = ["| variant | " + " | ".join(keys) + " | evaluation md5 |", "|---" * (len(keys) + 2) + "|"]
    for name, metrics, md5 in rows:
        cells = [f"{metrics[k]:.4f}" if k in metrics else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {md5} |")
    table = "\n".join(lines) + "\n"
    if os.environ.get("KFP_RUN_ID"):
        ArtifactStore().put_run_file(os.environ["KFP_RUN_ID"], "ablation.md", table)
    if table_path:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(table)
    print(table, flush=True)
    return table


def stand_in(stage: str, ref: str = "") -> str:
    """Output of a stage an ablation skipped: nothing (""), or another stage's output instead."""
    print(f"[medsight] {stage}: skipped by ablation switch" + (" (using upstream output instead)" if ref else ""))
    return ref
