"""``medsight platform ...``: run the KFP DAG locally, compile and submit it, pull checkpoints, serve S3.

Every failure is one line on stderr and an exit code: 2 when the command line is wrong, 1 when
the work failed. Machine-readable output (``--json``) goes to stdout alone.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from medsight.cli_errors import FAILURE, USAGE, error_message
from medsight.platform.resolve import DEFAULT_WORKDIR
from medsight.platform.submit import submit_command

platform_app = typer.Typer(
    help="Pipelines (KFP), artifacts (DVC on S3), tracking (MLflow).", no_args_is_help=True
)

WorkdirOpt = Annotated[
    Path, typer.Option("--workdir", help="Local platform directory (S3 data, DVC cache, MLflow, run repo)")
]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (messages go to stderr)")]


def _fail(message: str, hint: str = "", code: int = FAILURE) -> None:
    """One line on stderr (and a hint); exit 1 for a failure, 2 for a usage error."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(hint, err=True)
    raise typer.Exit(code=code)


def local_workdir(workdir: Path | None) -> Path | None:
    """``--workdir``, else ``runs/platform`` when it holds a local store, else None."""
    if workdir is not None:
        return workdir
    return DEFAULT_WORKDIR if (DEFAULT_WORKDIR / "s3").is_dir() else None


@contextlib.contextmanager
def store_env(workdir: Path | None) -> Iterator[None]:
    """Use the S3 store from the environment, or the local one under ``workdir`` (or
    ``runs/platform``): the server already serving it (``s3-serve``), else one started here."""
    import os

    from medsight.platform.resolve import ResolveError, open_store
    from medsight.platform.s3_server import S3ServerError

    if os.environ.get("MEDSIGHT_S3_ENDPOINT"):
        yield
        return
    chosen = local_workdir(workdir)
    if chosen is None:
        _fail("no S3 store to read: this is not a platform work directory and MEDSIGHT_S3_ENDPOINT is not set",
              f"Pass --workdir DIR (where `medsight platform run-local` ran; default {DEFAULT_WORKDIR}), "
              "or `source DIR/s3/client.env`, or set MEDSIGHT_S3_ENDPOINT, AWS_ACCESS_KEY_ID and "
              "AWS_SECRET_ACCESS_KEY for a remote store.", code=USAGE)
    if not (chosen / "s3").is_dir():
        _fail(f"{chosen.resolve()} has no local store (s3/)",
              "Run `medsight platform run-local` first, or set MEDSIGHT_S3_ENDPOINT.", code=USAGE)
    try:
        with open_store(chosen):
            yield
    except (S3ServerError, ResolveError) as error:
        _fail(error_message(error))


@platform_app.command("run-local")
def run_local_command(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    preset: Annotated[str, typer.Option(help="Config preset (tiny runs on a CPU)")] = "tiny",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Config override key.path=value")] = None,
    fast: Annotated[bool, typer.Option(help="Few steps per stage on a small synthetic set (smoke run)")] = False,
    variant: Annotated[str, typer.Option(help="Ablation variant by name (`medsight variants list`)")] = "full",
    data_revision: Annotated[str, typer.Option(help="Use this DVC dataset (md5 or run:<id>/synth-data)")] = "",
    force: Annotated[list[str] | None, typer.Option(help="Recompute these stages even if cached ('all' = every)")] = None,
    verbose: Annotated[bool, typer.Option(help="Show KFP and stage output instead of a log file")] = False,
    ablation: Annotated[bool, typer.Option(help="Run the ablation pipeline with every registered variant")] = False,
    variants: Annotated[str, typer.Option(help="Ablation pipeline over these variants, comma-separated")] = "",
    stage: Annotated[str, typer.Option(help="Run only this stage (single-stage pipeline)")] = "",
    inputs: Annotated[list[str] | None, typer.Option("--input", help="With --stage: NAME=REF (md5 or run:<id>/<stage>)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole pipeline through kfp.local with a local S3 server, DVC and MLflow; print a summary."""
    from medsight.platform.local_run import (
        FAST_OVERRIDES, LocalRunError, LocalRunRequest, format_summary, next_steps, result_json, run_local,
    )
    from medsight.platform.s3_server import S3ServerError
    from medsight.stages.registry import VARIANTS

    malformed = [pair for pair in inputs or [] if "=" not in pair]
    if malformed:
        _fail(f"--input {malformed[0]!r} must look like NAME=REF (e.g. --input data=run:<id>/synth-data)", code=USAGE)
    if inputs and not stage:
        _fail("--input needs --stage (the inputs of that one stage)", code=USAGE)
    request = LocalRunRequest(
        workdir=workdir, preset=preset, overrides=[*(FAST_OVERRIDES if fast else ()), *(overrides or [])],
        variant=variant, data_revision=data_revision, force=tuple(force or ()), verbose=verbose,
    )
    try:
        if ablation or variants:
            request.variants = [v.strip() for v in variants.split(",") if v.strip()] or [v.name for v in VARIANTS]
        if stage:
            request.stage = stage
            request.stage_inputs = dict(pair.split("=", 1) for pair in inputs or [])
        result = run_local(request, console=sys.stderr if as_json else None)
    except (LocalRunError, S3ServerError, ValueError, KeyError) as error:
        _fail(error_message(error))
    if as_json:
        typer.echo(json.dumps(result_json(result), indent=2))
        return
    typer.echo("")
    typer.echo(format_summary(result.stages))
    if result.ablation_table:
        typer.echo("Ablation variants (evaluation metrics):\n" + result.ablation_table)
    typer.echo(f"run {result.run_id}: {len(result.ran)} ran, {len(result.cached)} restored from cache, "
               f"{result.wall_seconds:.1f}s total; recorded as commit {result.commit[:10]} in {workdir / 'repo'}\n")
    typer.echo(next_steps(result))


@platform_app.command("compile")
def compile_command(
    out: Annotated[Path | None, typer.Option(help="Output directory (default pipelines/compiled)")] = None,
    settings: Annotated[Path | None, typer.Option(help="Deployment settings YAML (node labels, GPUs, images)")] = None,
    check: Annotated[bool, typer.Option(help="Only verify the golden YAML is current")] = False,
    variant: Annotated[str, typer.Option(help="Compile only the main pipeline, for this variant (`medsight variants list`)")] = "",
) -> None:
    """Compile the pipelines to KFP IR YAML for the Kubeflow Pipelines UI."""
    from pipelines import compile as compiler

    args = [*(["--out", str(out)] if out else []), *(["--settings", str(settings)] if settings else []),
            *(["--check"] if check else []), *(["--variant", variant] if variant else [])]
    try:
        code = compiler.main(args)
    except ValueError as error:
        _fail(error_message(error), "List the variants with `medsight variants list`.", code=USAGE)
    raise typer.Exit(code)


@platform_app.command("pull")
def pull_command(
    dest: Annotated[Path, typer.Option(help="Directory to write the checkpoint/dataset into")],
    run: Annotated[str, typer.Option(help="Run id ('latest' = newest recorded run)")] = "",
    stage: Annotated[str, typer.Option(help="Stage whose output to pull")] = "",
    md5: Annotated[str, typer.Option(help="Or: the DVC md5 of an output (e.g. from the KFP UI)")] = "",
    workdir: Annotated[Path | None, typer.Option(help="Local platform dir; starts its S3 server if needed")] = None,
) -> None:
    """Pull one stage output of one run from the DVC remote; bytes are identical to what the run pushed."""
    from medsight.platform.artifacts import ArtifactStore, ArtifactStoreError
    from medsight.platform.storage import StorageError

    if not md5 and not (run and stage):
        _fail("give --run and --stage, or --md5", "List runs with `medsight platform runs`.", code=USAGE)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        _fail(f"{dest} exists and is not an empty folder", "Choose a new --dest.", code=USAGE)
    with store_env(workdir):
        try:
            store = ArtifactStore()
            if run == "latest":
                runs = store.list_runs()
                if not runs:
                    _fail("no runs recorded in the store")
                run = runs[-1]
            ref = store.resolve(md5 or f"run:{run}/{stage}")
            if ref is None:
                _fail("no reference given", code=USAGE)
            with tempfile.TemporaryDirectory() as tmp, store.workspace(Path(tmp)) as ws:
                pulled = ws.pull(ref, "out")
                dest.parent.mkdir(parents=True, exist_ok=True)
                # Copy, not move: the pulled files may be links into the DVC cache.
                shutil.copytree(pulled, dest, dirs_exist_ok=True)
        except (ArtifactStoreError, StorageError) as error:
            _fail(error_message(error))
    typer.echo(f"pulled {ref.md5} ({ref.nfiles or '?'} files) -> {dest}")


@platform_app.command("runs")
def runs_command(
    workdir: Annotated[Path | None, typer.Option(help=f"Local platform dir (default {DEFAULT_WORKDIR} when it exists)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List recorded runs and their stage outputs (from the store's lineage records)."""
    from medsight.platform.artifacts import ArtifactStore, ArtifactStoreError
    from medsight.platform.storage import StorageError

    with store_env(workdir):
        try:
            store = ArtifactStore()
            runs = {run_id: store.load_lineage(run_id) for run_id in store.list_runs()}
        except (ArtifactStoreError, StorageError) as error:
            _fail(error_message(error))
    if as_json:
        typer.echo(json.dumps([
            {"run_id": run_id, "stages": [{"stage": r["stage"], "md5": r["ref"]["md5"], "cached": r["cached"],
                                            "git_commit": r.get("git_commit", ""), "variant": r.get("variant", "")}
                                           for r in records]}
            for run_id, records in runs.items()], indent=2))
        return
    if not runs:
        typer.echo("no runs recorded yet; `make pipeline` (or `medsight platform run-local`) records one", err=True)
    for run_id, records in runs.items():
        cached = sum(1 for r in records if r["cached"])
        typer.echo(f"{run_id}: {len(records)} stage outputs ({cached} from cache)")
        for record in records:
            typer.echo(f"    {record['stage']:<20s} {record['ref']['md5']}  {'cached' if record['cached'] else 'ran'}")


@platform_app.command("run-repo")
def run_repo_command(
    run: Annotated[str, typer.Option(help="Run id (a KFP run id, or 'latest')")],
    repo: Annotated[Path, typer.Option(help="git + DVC repository to record it in (created if missing)")],
    workdir: Annotated[Path | None, typer.Option(help=f"Local platform dir (default {DEFAULT_WORKDIR} when it exists)")] = None,
) -> None:
    """Record a run's outputs (e.g. of a cluster run) in a git + DVC repo: `git clone` + `dvc pull STAGE`."""
    from medsight.platform.artifacts import ArtifactStore, ArtifactStoreError
    from medsight.platform.run_repo import RunRepo
    from medsight.platform.storage import StorageError

    with store_env(workdir):
        try:
            store = ArtifactStore()
            if run == "latest":
                found = store.list_runs()
                if not found:
                    _fail("no runs recorded in the store")
                run = found[-1]
            records = store.load_lineage(run)
            if not records:
                _fail(f"no lineage recorded for run {run!r} under {store.config.url}",
                      "List runs with `medsight platform runs`.", code=USAGE)
            target = RunRepo(repo)
            target.ensure(store.config)
            commit = target.record_run(run, records, {"source": store.config.url})
        except (ArtifactStoreError, StorageError) as error:
            _fail(error_message(error))
    typer.echo(f"recorded run {run} ({len(records)} outputs) as commit {commit[:10]} in {target.path}")
    typer.echo(f"pull one: cd {target.path} && git checkout {run} && dvc pull {records[-1]['stage']}  "
               "(AWS_ENDPOINT_URL and credentials in the environment)")


@platform_app.command("s3-serve")
def s3_serve_command(
    directory: Annotated[Path, typer.Option("--dir", help="Data directory (e.g. runs/platform/s3)")] = DEFAULT_WORKDIR / "s3",
    port: Annotated[int | None, typer.Option(help="S3 port (default: the last one used, else free)")] = None,
) -> None:
    """Serve the local S3 store until Ctrl-C (for `dvc pull` from a clone of the run repo)."""
    from medsight.platform.run_repo import client_env_file
    from medsight.platform.s3_server import SeaweedS3Server

    from medsight.platform.local_run import client_settings
    from medsight.platform.s3_server import S3ServerError

    if not directory.is_dir():
        _fail(f"{directory} does not exist", "Run `make pipeline` (or `medsight platform run-local`) first, "
              "or pass --dir to a store directory.", code=USAGE)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        with SeaweedS3Server(directory, port=port) as server:
            env_file = client_env_file(directory, client_settings(server.env()))
            typer.echo(f"S3 endpoint {server.endpoint} (data in {directory.resolve()})")
            typer.echo(f"client settings (credentials, mode 0600): source {env_file}")
            typer.echo("Ctrl-C to stop.")
            try:
                while not stop["now"]:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    except S3ServerError as error:
        _fail(error_message(error))
    typer.echo("stopped.")


@platform_app.command("dvc-files")
def dvc_files_command(
    preset: Annotated[str, typer.Option(help="Preset written into params.yaml")] = "tiny",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Config override key.path=value")] = None,
    variant: Annotated[str, typer.Option(help="Ablation variant by name (`medsight variants list`)")] = "full",
    root: Annotated[Path, typer.Option(help="Repository root")] = Path("."),
    check: Annotated[bool, typer.Option(help="Only verify dvc.yaml/params.yaml are current")] = False,
) -> None:
    """Write dvc.yaml (the stage graph) and params.yaml (the config) so `dvc repro` reproduces a run.

    For a variant: `medsight platform dvc-files --variant codebook-8 && dvc exp run -n codebook-8`.
    """
    from medsight.io_utils import atomic_write_text
    from medsight.platform.graph import PARAMS_FILE, render_dvc_yaml, render_params_yaml

    try:
        files = {root / "dvc.yaml": render_dvc_yaml(variant),
                 root / PARAMS_FILE: render_params_yaml(preset, overrides, variant)}
    except (KeyError, ValueError) as error:
        _fail(error_message(error), code=USAGE)
    if check:
        stale = [str(p) for p, text in files.items() if not p.is_file() or p.read_text() != text]
        if stale:
            _fail(f"stale: {', '.join(stale)}", "Regenerate with: medsight platform dvc-files")
        typer.echo("dvc.yaml and params.yaml are up to date")
        return
    for path, text in files.items():
        atomic_write_text(path, text)
        typer.echo(f"wrote {path}")
    typer.echo("Reproduce without Kubeflow: dvc repro   (then: dvc push)")


# `medsight platform submit FILE --host URL ...` (medsight/platform/submit.py).
platform_app.command("submit")(submit_command)
