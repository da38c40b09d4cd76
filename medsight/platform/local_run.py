"""The embedded platform on one machine: the whole KFP DAG through ``kfp.local``.

``medsight platform run-local`` starts a SeaweedFS S3 server under the work directory, points
DVC (remote + shared cache), the run-cache and MLflow (sqlite) at it, runs the same compiled
stage components the cluster runs, records the run in a git+DVC repo, prints a per-stage
summary and stops the server. Everything lives under ``--workdir``::

    s3/          SeaweedFS data, credentials.json (0600), weed.log
    dvc-cache/   DVC cache shared by the stage processes (inputs are linked from here)
    mlflow/      mlflow.db + artifacts: one parent run per pipeline run, a child per stage
    kfp/         kfp.local pipeline root (pointer + metrics artifacts)
    repo/        git + DVC repo: dvc.yaml + dvc.lock (every output), runs/<run_id>.json, one tag per run
    logs/        component output of each run (one progress line per tenth of a stage's steps)

While it runs, the terminal shows one live line for the current stage (step/total, loss, time
left), drawn from the components' event file (``progress_view.py``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from medsight.cli_errors import error_message
from medsight.platform.artifacts import CACHE_ENV, STORE_ENV, ArtifactStore
from medsight.platform.component_runtime import FORCE_ENV, WORK_DIR_ENV
from medsight.platform.mlflow_runs import PARENT_OWNED_ENV
from medsight.platform.progress_view import ProgressView, captured_output
from medsight.platform.run_repo import CLIENT_ENV_KEYS, RunRepo, client_env_file
from medsight.platform.s3_server import SeaweedS3Server
from medsight.platform.stage_server import SERVER_ENV, StageServer
from medsight.platform.tracking import ARTIFACTS_ENV, SYSTEM_METRICS_ENV
from medsight.stages.lineage import COMMIT_ENV, VARIANT_ENV, git_commit
from medsight.train.progress_events import EVENTS_ENV

LOCAL_STORE_URL = "s3://medsight/store"
# Small but complete: every stage trains a few steps on a few dozen images (a few minutes on 2 CPUs).
FAST_OVERRIDES = (
    "data.train_images=40", "data.val_images=10", "data.test_images=10",
    "perceiver_pretrain.max_steps=5", "perceiver_pretrain.batch_size=4",
    "codebook_pretrain.max_steps=5", "codebook_pretrain.batch_size=4",
    "v2t_align.max_steps=3", "t2v_align.max_steps=3", "instruct_tune.max_steps=3",
)


class LocalRunError(RuntimeError):
    """The local pipeline run failed; the message says where the logs are and what to do."""


@dataclass
class LocalRunRequest:
    workdir: Path
    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    # A registry variant (medsight/stages/registry.py) for the main pipeline.
    variant: str = "full"
    data_revision: str = ""
    force: tuple[str, ...] = ()
    verbose: bool = False
    # Set: run the ablation pipeline over these registry variants.
    variants: list[str] | None = None
    # Set: run only this stage (single-stage pipeline), inputs as DVC references.
    stage: str = ""
    stage_inputs: dict[str, str] = field(default_factory=dict)

    @property
    def pipeline_name(self) -> str:
        from pipelines.medsight_pipeline import ABLATION_NAME, PIPELINE_NAME, SINGLE_STAGE_NAME

        return SINGLE_STAGE_NAME if self.stage else ABLATION_NAME if self.variants is not None else PIPELINE_NAME

    def pipeline_arguments(self) -> dict[str, Any]:
        if self.stage:
            return {"stage_name": self.stage, "inputs": dict(self.stage_inputs), "preset": self.preset,
                    "overrides": list(self.overrides)}
        if self.variants is not None:
            # The ablation pipeline's variants are compiled in (see _build_pipeline).
            return {"preset": self.preset, "overrides": list(self.overrides), "data_revision": self.data_revision}
        return {"preset": self.preset, "overrides": list(self.overrides), "data_revision": self.data_revision}


@dataclass
class StageSummary:
    stage: str
    status: str  # ran | cached | skipped
    seconds: float = 0.0  # stage compute
    wall_seconds: float = 0.0  # whole component process
    metrics: dict[str, float] = field(default_factory=dict)
    md5: str = ""


@dataclass
class LocalRunResult:
    run_id: str
    workdir: Path
    stages: list[StageSummary]
    wall_seconds: float
    commit: str
    tracking_uri: str
    report: Path | None
    ablation_table: str | None = None

    @property
    def ran(self) -> list[str]:
        return [s.stage for s in self.stages if s.status == "ran"]

    @property
    def cached(self) -> list[str]:
        return [s.stage for s in self.stages if s.status == "cached"]


@contextlib.contextmanager
def patched_env(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _validate(request: LocalRunRequest) -> None:
    """Fail on a bad variant, stage or override before starting servers, with the name in the message."""
    from medsight.stages.cache_key import variant_plan
    from medsight.stages.registry import get_stage

    try:
        if request.stage:
            get_stage(request.stage)
        for name in request.variants if request.variants is not None else [request.variant]:
            variant_plan(name, request.preset, list(request.overrides))
    except (KeyError, ValueError) as error:
        raise LocalRunError(error_message(error)) from error


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (e.g. `timeout`, a CI cancel) unwinds like Ctrl-C, so the S3 server is stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def client_settings(server_env: Mapping[str, str]) -> dict[str, str]:
    """What ``client.env`` exports: the endpoint and credentials DVC, aws and MLflow read, the
    store URL, and one attempt per request so a pull against a stopped server fails in seconds."""
    return {**{key: server_env[key] for key in CLIENT_ENV_KEYS if key in server_env},
            "AWS_MAX_ATTEMPTS": "1", "MEDSIGHT_S3_ENDPOINT": server_env["MEDSIGHT_S3_ENDPOINT"],
            STORE_ENV: LOCAL_STORE_URL}


class _PipelineRun(threading.Thread):
    """Opens the pipeline's parent MLflow run while the pipeline starts (MLflow takes seconds to
    import); the stages find the same run by its KFP run id. System metrics of the machine are
    sampled into it, once for every stage on this machine."""

    def __init__(self, run_id: str, preset: str) -> None:
        super().__init__(daemon=True, name="mlflow-parent")
        self.run_id, self.preset = run_id, preset
        self.tracker: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from medsight.platform.tracking import MLflowTracker

        try:
            self.tracker = MLflowTracker.from_env(stage="pipeline", run_name=f"pipeline {self.run_id}", log_config=False,
                                                  tags={"medsight.preset": self.preset}, system_metrics=True,
                                                  pipeline_run_id=self.run_id)
        except Exception as error:  # noqa: BLE001 - reported after the pipeline; tracking never stops training
            self.error = error


def new_run_id() -> str:
    return time.strftime("local-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def run_local(request: LocalRunRequest, console: IO[str] | None = None) -> LocalRunResult:
    from medsight.stages.registry import STAGES, evaluation_stage

    console = console or sys.stdout
    _validate(request)
    workdir = Path(request.workdir).resolve()
    run_id = new_run_id()
    for sub in ("dvc-cache", "mlflow", "kfp", "work", "logs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    events = workdir / "logs" / f"{run_id}.events.jsonl"
    log_path = workdir / "logs" / f"{run_id}.log"
    tracking_db = workdir / "mlflow" / "mlflow.db"
    tracking_uri = f"sqlite:///{tracking_db}"
    started = time.time()
    console.write(f"MedSIGHT local pipeline run {run_id} (preset {request.preset}) in {workdir}\n")
    server = SeaweedS3Server(workdir / "s3")
    with _sigterm_as_exit(), contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        server.start(wait=False)
        # KFP's import and the DAG's build take seconds of this process; SeaweedFS boots meanwhile.
        pipeline = _build_pipeline(request)
        server.wait_ready()
        console.write(f"  S3 (SeaweedFS) at {server.endpoint}; DVC remote {LOCAL_STORE_URL}/dvc\n")
        client_env_file(workdir / "s3", client_settings(server.env()))
        env = {
            **server.env(),
            STORE_ENV: LOCAL_STORE_URL,
            CACHE_ENV: str(workdir / "dvc-cache"),
            WORK_DIR_ENV: str(workdir / "work"),
            EVENTS_ENV: str(events),
            "MLFLOW_TRACKING_URI": tracking_uri,
            ARTIFACTS_ENV: str(workdir / "mlflow" / "artifacts"),
            "KFP_RUN_ID": run_id,
            COMMIT_ENV: git_commit(),
            VARIANT_ENV: request.variant if request.variants is None else "",
            # The parent run samples this machine's metrics once; the stages' runs need not.
            SYSTEM_METRICS_ENV: "false",
            PARENT_OWNED_ENV: "1",
            FORCE_ENV: ",".join(request.force),
            "DVC_NO_ANALYTICS": "1",
            "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
            "PYTHONWARNINGS": "ignore",
        }
        # Stage processes are forked from a warm interpreter that has the stage libraries imported.
        stages = StageServer(log_path.with_suffix(".stage-server.log"))
        env[SERVER_ENV] = str(stages.socket)
        stack.callback(stages.stop)
        with patched_env(env):
            stages.start()
            # A new sqlite store's schema is made while the pipeline starts; the first stages'
            # trackers wait for it on its lock file (mlflow_runs.prepare_sqlite_store).
            parent = _PipelineRun(run_id, request.preset)
            parent.start()
            try:
                store = ArtifactStore()
                store.ensure_ready()
                repo = RunRepo(workdir / "repo")
                repo.ensure(store.config)
                _run_pipeline(pipeline, request, workdir, events, log_path, console)
            except BaseException:
                parent.join()
                if parent.tracker is not None:
                    parent.tracker.close("FAILED")
                raise
            records = store.load_lineage(run_id)
            summaries = _summaries(STAGES, records, show_skipped=request.variants is None and not request.stage)
            wall = time.time() - started
            commit = repo.record_run(run_id, records, {
                "preset": request.preset, "variant": request.variant if request.variants is None else "",
                "arguments": request.pipeline_arguments(), "wall_seconds": round(wall, 2),
            }, _stage_commands(request))
            report = None
            final = evaluation_stage().name
            evaluations = [r for r in records if r["stage"] == final]
            if len(evaluations) == 1:
                md5 = evaluations[0]["ref"]["md5"]
                evaluation = repo.checkout_dir(final, md5) or repo.pull(final)
                found = sorted(evaluation.rglob("*.html"))
                report = found[0] if found else None
            table = store.get_run_file(run_id, "ablation.md") if request.variants is not None else None
            server.begin_stop()  # no S3 from here on: it flushes while MLflow records the run
            parent.join()
            if parent.tracker is None:
                console.write(f"  MLflow: the pipeline run could not be recorded ({parent.error})\n")
            else:
                _log_pipeline_run(parent.tracker, request, summaries, records, wall, log_path)
    return LocalRunResult(run_id, workdir, summaries, time.time() - started, commit, tracking_uri, report, table)


def _build_pipeline(request: LocalRunRequest) -> Any:
    from pipelines.deployment import DeploymentSettings
    from pipelines.medsight_pipeline import build_pipelines

    # Same DAG as the compiled YAML; only retries are off: kfp.local honours them (with a 60 s
    # backoff), and locally a failure is deterministic, so retrying only delays the error.
    name = request.pipeline_name
    settings = DeploymentSettings(retries=0, ablation_variants=list(request.variants or []))
    return build_pipelines(settings, names=(name,), variant=request.variant)[name]


def _run_pipeline(pipeline: Any, request: LocalRunRequest, workdir: Path, events: Path, log_path: Path,
                  console: IO[str]) -> None:
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"), raise_on_error=True)
    # Captured: the live line replaces tqdm's bars, which would fill the log with one line per update.
    quiet_bars = patched_env({"TQDM_DISABLE": "1"}) if not request.verbose else contextlib.nullcontext()
    with captured_output(log_path, not request.verbose, console) as (out, log), quiet_bars:
        progress = ProgressView(events, out, log)
        progress.start()
        try:
            pipeline(**request.pipeline_arguments())
        except Exception as error:
            progress.stop()
            raise LocalRunError(
                f"pipeline failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}\n"
                f"  component output: {log_path}\n{_tail(log_path)}\n"
                "Fix the cause and rerun the same command: stages that finished are restored from the run-cache."
            ) from error
        progress.stop()
    if not request.verbose:
        console.write(f"  component output: {log_path}\n")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    interesting = [line for line in text if "Error" in line or "error" in line or "Traceback" in line]
    shown = (interesting[-8:] if interesting else []) + text[-lines:]
    return "\n".join("    " + line for line in shown)


def _summaries(stages: Sequence[Any], records: Sequence[Mapping[str, Any]], show_skipped: bool = True) -> list[StageSummary]:
    """One row per stage execution, in DAG order (an ablation has several per stage)."""
    summaries = []
    for spec in stages:
        mine = [r for r in records if r["stage"] == spec.name]
        if not mine and show_skipped:
            summaries.append(StageSummary(spec.name, "skipped"))
        for record in mine:
            summaries.append(StageSummary(
                spec.name, "cached" if record["cached"] else "ran", float(record["seconds"]),
                float(record["wall_seconds"]), {k: float(v) for k, v in record["metrics"].items()},
                record["ref"]["md5"],
            ))
    return summaries


def _stage_commands(request: LocalRunRequest) -> dict[str, str]:
    """The command that reproduces each stage of the run (for the run repo's dvc.yaml)."""
    if request.variants is not None or request.stage:
        return {}
    from medsight.stages.cache_key import variant_plan
    from medsight.stages.registry import active_stages, get_variant, input_sources

    plan = variant_plan(request.variant, request.preset, list(request.overrides))
    variant = get_variant(request.variant)
    commands = {}
    for spec in active_stages(variant.drops):
        inputs = "".join(f" --input {name}=outputs/{source}" for name, source in sorted(input_sources(spec, variant.drops).items()))
        overrides = "".join(f" --set {override}" for override in plan[spec.name]["overrides"])
        commands[spec.name] = f"medsight stage run {spec.name} --out outputs/{spec.name}{inputs} --preset {request.preset}{overrides}"
    return commands


def _log_pipeline_run(tracker: Any, request: LocalRunRequest, summaries: list[StageSummary],
                      records: Sequence[Mapping[str, Any]], wall: float, log_path: Path) -> None:
    """The parent run: arguments, per-stage time/cache, summary table; a child for every restored
    stage (computed stages made their own), so the parent lists every stage of the pipeline."""
    from medsight.platform.mlflow_runs import log_restored_stage

    try:
        tracker.log_params({"pipeline": request.pipeline_arguments()})
        metrics: dict[str, float] = {"wall_seconds": wall}
        for s in summaries:
            if s.status != "skipped":
                metrics[f"{s.stage}.seconds"] = metrics.get(f"{s.stage}.seconds", 0.0) + s.seconds
                metrics[f"{s.stage}.ran"] = metrics.get(f"{s.stage}.ran", 0.0) + (s.status == "ran")
        tracker.log_metrics(metrics)
        counts = {s.stage: sum(1 for t in summaries if t.stage == s.stage and t.md5) for s in summaries}
        tracker.set_tags({f"dvc.{s.stage}": s.md5 for s in summaries if s.md5 and counts[s.stage] == 1})
        if request.variants is None:
            tracker.set_tags({"medsight.variant": request.variant})
        for record in records:
            if record["cached"]:
                log_restored_stage(tracker.client, tracker.experiment_id, tracker.run_id, record)
        table = log_path.with_suffix(".summary.txt")
        table.write_text(format_summary(summaries))
        tracker.log_artifact(table, "summary")
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()


def format_summary(stages: Sequence[StageSummary]) -> str:
    from medsight.stages.registry import get_stage

    lines = [f"{'stage':<20s} {'status':<8s} {'compute':>8s} {'process':>8s}  {'output md5':<10s}  key metrics"]
    for s in stages:
        keys = [k for k in get_stage(s.stage).metrics if k in s.metrics] or list(s.metrics)[:3]
        shown = ", ".join(f"{k}={s.metrics[k]:.4g}" for k in keys)
        compute = f"{s.seconds:.1f}s" if s.status == "ran" else "-"
        process = f"{s.wall_seconds:.1f}s" if s.status != "skipped" else "-"
        lines.append(f"{s.stage:<20s} {s.status:<8s} {compute:>8s} {process:>8s}  {s.md5[:10]:<10s}  {shown}")
    return "\n".join(lines) + "\n"


def next_steps(result: LocalRunResult) -> str:
    from medsight.stages.registry import get_stage

    w = result.workdir
    # The newest trained model of the run: what a user most often wants to pull.
    models = [s.stage for s in result.stages if s.md5 and get_stage(s.stage).output == "model"]
    example = models[-1] if models else result.stages[0].stage
    report = f"  HTML report:     {result.report}\n" if result.report else ""
    return (
        "Next:\n"
        f"{report}"
        f"  MLflow UI:       mlflow ui --backend-store-uri {result.tracking_uri} --port 5000  (open http://127.0.0.1:5000)\n"
        f"  Pull a checkpoint here:   medsight platform pull --workdir {w} --run {result.run_id} --stage {example} --dest ./{example}\n"
        f"  Pull with plain DVC:      medsight platform s3-serve --dir {w / 's3'}   # then, in another shell:\n"
        f"                            source {w / 's3' / 'client.env'} && git clone {w / 'repo'} run && cd run && "
        f"git checkout {result.run_id} && dvc pull {example}\n"
        "  Rerun (unchanged stages come from the cache): same command; e.g. --variant codebook-8 retrains only "
        "codebook-pretrain and what depends on it (`medsight variants list`)\n"
        "  On the cluster: medsight platform compile, then upload pipelines/compiled/medsight-pipeline.yaml in the KFP UI\n"
    )


def result_json(result: LocalRunResult) -> dict[str, Any]:
    """``run-local --json``: the run, every stage's status and DVC hash, where things are."""
    return {
        "run_id": result.run_id, "commit": result.commit, "wall_seconds": round(result.wall_seconds, 2),
        "tracking_uri": result.tracking_uri, "report": str(result.report) if result.report else None,
        "repo": str(result.workdir / "repo"),
        "stages": [{"stage": s.stage, "status": s.status, "md5": s.md5, "seconds": s.seconds, "metrics": s.metrics}
                   for s in result.stages],
    }
