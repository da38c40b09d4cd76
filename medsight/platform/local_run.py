"""The embedded platform on one machine: the whole KFP DAG through ``kfp.local``.

``medsight platform run-local`` starts a SeaweedFS S3 server under the work directory, points
DVC (remote + shared cache), the run-cache and MLflow (sqlite) at it, runs the same compiled
stage components the cluster runs, records the run in a git+DVC repo, prints a per-stage
summary and stops the server. Everything lives under ``--workdir``::

    s3/          SeaweedFS data, credentials.json (0600), weed.log
    dvc-cache/   DVC cache shared by the stage processes (inputs are linked from here)
    mlflow/      mlflow.db + artifacts
    kfp/         kfp.local pipeline root (pointer + metrics artifacts)
    repo/        git + DVC repo: outputs/<stage>.dvc, runs/<run_id>.json, one tag per run
    logs/        component output of each run
"""

from __future__ import annotations

import contextlib
import json
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
from medsight.platform.component_runtime import EVENTS_ENV, FORCE_ENV, WORK_DIR_ENV
from medsight.platform.run_repo import RunRepo, client_env_file
from medsight.platform.s3_server import SeaweedS3Server
from medsight.platform.tracking import ARTIFACTS_ENV, git_commit

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
            # The ablation pipeline's variants are compiled in (see _run_pipeline).
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


@contextlib.contextmanager
def _captured_output(log_path: Path, capture: bool, console: IO[str]) -> Iterator[IO[str]]:
    """Send KFP's and the components' chatter to ``log_path``; yield where progress lines go."""
    if not capture:
        yield console
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log:
        # Both levels: child processes write to fds 1/2, KFP's Python logging to sys.stdout
        # (which a test runner may have replaced by its own buffer).
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        # The terminal itself is now fd 1 no more: write progress to a duplicate of it.
        terminal = console is sys.__stdout__ or console is saved_streams[0]
        out = os.fdopen(os.dup(saved_out), "w", buffering=1) if terminal else console
        try:
            yield out
        finally:
            log.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            if terminal:
                out.close()


class _Progress(threading.Thread):
    """Print one line per stage start/end by following the components' event file."""

    def __init__(self, events: Path, console: IO[str]) -> None:
        super().__init__(daemon=True)
        self.events, self.console, self.done = events, console, threading.Event()
        self.offset = 0

    def run(self) -> None:
        while not self.done.is_set():
            self.drain()
            self.done.wait(0.5)
        self.drain()

    def drain(self) -> None:
        if not self.events.is_file():
            return
        with open(self.events) as handle:
            handle.seek(self.offset)
            for line in handle:
                if not line.endswith("\n"):
                    break
                self.offset += len(line.encode())
                event = json.loads(line)
                if event["event"] == "start":
                    self.console.write(f"  ... {event['stage']}\n")
                else:
                    how = "restored from run-cache" if event["cached"] else f"ran {event['seconds']:.1f}s"
                    self.console.write(f"  ok  {event['stage']:<20s} {how} (component {event['wall_seconds']:.1f}s)\n")
        self.console.flush()


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


def _import_mlflow() -> None:
    with contextlib.suppress(Exception):
        import mlflow.tracking  # noqa: F401


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
    tracking_uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    started = time.time()
    console.write(f"MedSIGHT local pipeline run {run_id} (preset {request.preset}) in {workdir}\n")
    with _sigterm_as_exit(), SeaweedS3Server(workdir / "s3") as server:
        console.write(f"  S3 (SeaweedFS) at {server.endpoint}; DVC remote {LOCAL_STORE_URL}/dvc\n")
        client_env_file(workdir / "s3", {**server.env(), STORE_ENV: LOCAL_STORE_URL})
        env = {
            **server.env(),
            STORE_ENV: LOCAL_STORE_URL,
            CACHE_ENV: str(workdir / "dvc-cache"),
            WORK_DIR_ENV: str(workdir / "work"),
            EVENTS_ENV: str(events),
            "MLFLOW_TRACKING_URI": tracking_uri,
            ARTIFACTS_ENV: str(workdir / "mlflow" / "artifacts"),
            "KFP_RUN_ID": run_id,
            "MEDSIGHT_GIT_COMMIT": git_commit(),
            FORCE_ENV: ",".join(request.force),
            "DVC_NO_ANALYTICS": "1",
            "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
            "PYTHONWARNINGS": "ignore",
        }
        with patched_env(env):
            # MLflow takes seconds to import; do it while the pipeline runs (for the run summary).
            warm = threading.Thread(target=_import_mlflow, daemon=True)
            warm.start()
            store = ArtifactStore()
            store.ensure_ready()
            repo = RunRepo(workdir / "repo")
            repo.ensure(store.config)
            _run_pipeline(request, workdir, events, log_path, console)
            records = store.load_lineage(run_id)
            summaries = _summaries(STAGES, records, show_skipped=request.variants is None and not request.stage)
            wall = time.time() - started
            commit = repo.record_run(run_id, records, {
                "preset": request.preset, "arguments": request.pipeline_arguments(), "wall_seconds": round(wall, 2),
            })
            report = None
            final = evaluation_stage().name
            evaluations = [r for r in records if r["stage"] == final]
            if len(evaluations) == 1:
                md5 = evaluations[0]["ref"]["md5"]
                evaluation = repo.checkout_dir(final, md5) or repo.pull(final)
                found = sorted(evaluation.rglob("*.html"))
                report = found[0] if found else None
            table = store.get_run_file(run_id, "ablation.md") if request.variants is not None else None
            warm.join()
            _log_pipeline_run(run_id, request, summaries, wall, log_path)
    return LocalRunResult(run_id, workdir, summaries, time.time() - started, commit, tracking_uri, report, table)


def _run_pipeline(request: LocalRunRequest, workdir: Path, events: Path, log_path: Path, console: IO[str]) -> None:
    from kfp import local

    from pipelines.deployment import DeploymentSettings
    from pipelines.medsight_pipeline import build_pipelines

    # Same DAG as the compiled YAML; only retries are off: kfp.local honours them (with a 60 s
    # backoff), and locally a failure is deterministic, so retrying only delays the error.
    name = request.pipeline_name
    settings = DeploymentSettings(retries=0, ablation_variants=list(request.variants or []))
    pipeline = build_pipelines(settings, names=(name,), variant=request.variant)[name]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"), raise_on_error=True)
    with _captured_output(log_path, not request.verbose, console) as out:
        progress = _Progress(events, out)
        progress.start()
        try:
            pipeline(**request.pipeline_arguments())
        except Exception as error:
            progress.done.set()
            progress.join()
            raise LocalRunError(
                f"pipeline failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}\n"
                f"  component output: {log_path}\n{_tail(log_path)}\n"
                "Fix the cause and rerun the same command: stages that finished are restored from the run-cache."
            ) from error
        progress.done.set()
        progress.join()
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


def _log_pipeline_run(run_id: str, request: LocalRunRequest, summaries: list[StageSummary], wall: float,
                      log_path: Path) -> None:
    """One MLflow run for the pipeline as a whole: arguments, per-stage time/cache, summary table."""
    from medsight.platform.tracking import MLflowTracker

    with MLflowTracker.from_env(stage="pipeline", run_name=f"pipeline {run_id}", log_config=False,
                                tags={"medsight.preset": request.preset}) as tracker:
        tracker.log_params({"pipeline": request.pipeline_arguments()})
        metrics: dict[str, float] = {"wall_seconds": wall}
        for s in summaries:
            if s.status != "skipped":
                metrics[f"{s.stage}.seconds"] = metrics.get(f"{s.stage}.seconds", 0.0) + s.seconds
                metrics[f"{s.stage}.ran"] = metrics.get(f"{s.stage}.ran", 0.0) + (s.status == "ran")
        tracker.log_metrics(metrics)
        counts = {s.stage: sum(1 for t in summaries if t.stage == s.stage and t.md5) for s in summaries}
        tracker.set_tags({f"dvc.{s.stage}": s.md5 for s in summaries if s.md5 and counts[s.stage] == 1})
        table = log_path.with_suffix(".summary.txt")
        table.write_text(format_summary(summaries))
        tracker.log_artifact(table, "summary")


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
        f"git checkout {result.run_id} && dvc pull outputs/{example}.dvc\n"
        "  Rerun (unchanged stages come from the cache): same command; e.g. --variant codebook-8 retrains only "
        "codebook-pretrain and what depends on it (`medsight variants list`)\n"
        "  On the cluster: medsight platform compile, then upload pipelines/compiled/medsight-pipeline.yaml in the KFP UI\n"
    )
