"""``medsight platform ...``: run the KFP DAG locally, compile it, pull checkpoints, serve S3."""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from medsight.cli_errors import error_message

platform_app = typer.Typer(
    help="Pipelines (KFP), artifacts (DVC on S3), tracking (MLflow).", no_args_is_help=True
)

WorkdirOpt = Annotated[
    Path, typer.Option("--workdir", help="Local platform directory (S3 data, DVC cache, MLflow, run repo)")
]
DEFAULT_WORKDIR = Path("runs/platform")


def _fail(message: str, hint: str = "") -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(hint, err=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def store_env(workdir: Path | None) -> Iterator[None]:
    """Use the S3 store from the environment, or start the local one under ``workdir``."""
    import os

    from medsight.platform.artifacts import CACHE_ENV, STORE_ENV
    from medsight.platform.local_run import LOCAL_STORE_URL, patched_env
    from medsight.platform.s3_server import SeaweedS3Server

    if os.environ.get("MEDSIGHT_S3_ENDPOINT") or workdir is None:
        yield
        return
    workdir = workdir.resolve()
    if not (workdir / "s3").is_dir():
        _fail(f"{workdir} has no local store (s3/)", "Run `medsight platform run-local` first, or set MEDSIGHT_S3_ENDPOINT.")
    typer.echo(f"starting the local S3 server of {workdir} ...", err=True)
    with SeaweedS3Server(workdir / "s3") as server:
        env = {**server.env(), STORE_ENV: LOCAL_STORE_URL, CACHE_ENV: str(workdir / "dvc-cache"), "DVC_NO_ANALYTICS": "1"}
        with patched_env(env):
            yield


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
) -> None:
    """Run the whole pipeline through kfp.local with a local S3 server, DVC and MLflow; print a summary."""
    from medsight.platform.local_run import (
        FAST_OVERRIDES, LocalRunError, LocalRunRequest, format_summary, next_steps, run_local,
    )
    from medsight.stages.registry import VARIANTS

    request = LocalRunRequest(
        workdir=workdir, preset=preset, overrides=[*(FAST_OVERRIDES if fast else ()), *(overrides or [])],
        variant=variant, data_revision=data_revision, force=tuple(force or ()), verbose=verbose,
    )
    try:
        if ablation or variants:
            request.variants = [v.strip() for v in variants.split(",") if v.strip()] or [v.name for v in VARIANTS]
        if stage:
            request.stage = stage
            request.stage_inputs = dict(pair.split("=", 1) for pair in inputs or [] if "=" in pair)
        result = run_local(request)
    except (LocalRunError, ValueError, KeyError) as error:
        _fail(error_message(error))
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
        _fail(str(error))
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
        _fail("give --run and --stage, or --md5", "List runs with `medsight platform runs`.")
    if dest.exists() and any(dest.iterdir()):
        _fail(f"{dest} exists and is not empty", "Choose a new --dest.")
    with store_env(workdir):
        try:
            store = ArtifactStore()
            if run == "latest":
                runs = store.list_runs()
                if not runs:
                    _fail("no runs recorded in the store")
                run = runs[-1]
            ref = store.resolve(md5 or f"run:{run}/{stage}")
            assert ref is not None
            with tempfile.TemporaryDirectory() as tmp, store.workspace(Path(tmp)) as ws:
                pulled = ws.pull(ref, "out")
                dest.parent.mkdir(parents=True, exist_ok=True)
                # Copy, not move: the pulled files may be links into the DVC cache.
                shutil.copytree(pulled, dest, dirs_exist_ok=True)
        except (ArtifactStoreError, StorageError) as error:
            _fail(str(error))
    typer.echo(f"pulled {ref.md5} ({ref.nfiles or '?'} files) -> {dest}")


@platform_app.command("runs")
def runs_command(workdir: Annotated[Path | None, typer.Option(help="Local platform dir")] = None) -> None:
    """List recorded runs and their stage outputs (from the store's lineage records)."""
    from medsight.platform.artifacts import ArtifactStore

    with store_env(workdir):
        store = ArtifactStore()
        for run_id in store.list_runs():
            records = store.load_lineage(run_id)
            cached = sum(1 for r in records if r["cached"])
            typer.echo(f"{run_id}: {len(records)} stage outputs ({cached} from cache)")
            for record in records:
                typer.echo(f"    {record['stage']:<20s} {record['ref']['md5']}  {'cached' if record['cached'] else 'ran'}")


@platform_app.command("s3-serve")
def s3_serve_command(
    directory: Annotated[Path, typer.Option("--dir", help="Data directory (e.g. runs/platform/s3)")] = DEFAULT_WORKDIR / "s3",
    port: Annotated[int | None, typer.Option(help="S3 port (default: the last one used, else free)")] = None,
) -> None:
    """Serve the local S3 store until Ctrl-C (for `dvc pull` from a clone of the run repo)."""
    from medsight.platform.artifacts import STORE_ENV
    from medsight.platform.local_run import LOCAL_STORE_URL
    from medsight.platform.run_repo import client_env_file
    from medsight.platform.s3_server import SeaweedS3Server

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    with SeaweedS3Server(directory, port=port) as server:
        env_file = client_env_file(directory, {**server.env(), STORE_ENV: LOCAL_STORE_URL})
        typer.echo(f"S3 endpoint {server.endpoint} (data in {directory.resolve()})")
        typer.echo(f"client settings (credentials, mode 0600): source {env_file}")
        typer.echo("Ctrl-C to stop.")
        try:
            while not stop["now"]:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
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
        _fail(error_message(error))
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
