"""``medsight registry ...``: package, register (gated), list, show, promote and deploy models."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

registry_app = typer.Typer(help="MLflow model registry: package, register, list, show, promote, deploy.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

TrackingOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI).")]


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _base_for(model: Path, base: Path | None) -> Path:
    from medsight.platform.resolve import ResolveError, base_for

    try:
        return base_for(model, base)  # the recorded folder, a sibling output, the cache or the store
    except ResolveError as error:
        _fail(str(error), 2)
    raise AssertionError  # unreachable: _fail exits


def _errors():
    from medsight.data.errors import DataError
    from medsight.platform.model_registry import RegistryError
    from medsight.platform.tracking import TrackingError
    from medsight.serve.package import PackageError

    return (RegistryError, TrackingError, PackageError, DataError, FileNotFoundError)


@registry_app.command("package")
def package_command(
    model: Annotated[Path, typer.Option(help="Trained model folder (instruct-tune output).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Package folder to write.")],
    base: Annotated[Path | None, typer.Option(help="base-models output (default: from the model's stage.json).")] = None,
    name: str = "medsight",
) -> None:
    """Build a self-contained model package (serve it with `medsight serve --model OUT`)."""
    from medsight.serve.package import build_package

    try:
        path = build_package(model, _base_for(model, base), out_dir, name=name)
    except _errors() as error:
        _fail(str(error))
    console.print(f"package written: {path}  (next: medsight serve --model {path})")


@registry_app.command("register")
def register_command(
    evaluate: Annotated[Path, typer.Option(help="evaluate stage output (holds metrics.json).")],
    model: Annotated[Path, typer.Option(help="The evaluated model (instruct-tune output).")],
    base: Annotated[Path | None, typer.Option(help="base-models output (default: from the model's stage.json).")] = None,
    threshold: Annotated[list[str] | None, typer.Option(help="Gate METRIC=MIN, repeatable (e.g. seg_dice=0.5).")] = None,
    name: str = "medsight",
    alias: Annotated[str | None, typer.Option(help="Also point this alias (e.g. staging) at the new version.")] = None,
    kfp_run_id: Annotated[str | None, typer.Option(help="Orchestrator run id (default: $KFP_RUN_ID, else 'local').")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Register an evaluated model if every threshold holds; the version carries its lineage."""
    from medsight.platform.model_registry import parse_thresholds, register_from_evaluation

    try:
        thresholds = parse_thresholds(threshold)
        result = register_from_evaluation(
            evaluate, model, _base_for(model, base), thresholds, {"kfp_run_id": kfp_run_id} if kfp_run_id else None,
            name=name, tracking_uri=tracking_uri, alias=alias,
        )
    except _errors() as error:
        _fail(str(error))
    if not result.registered:
        for failure in result.gate.failures:
            console.print(f"[red]gate:[/red] {failure}")
        _fail(f"not registered: {len(result.gate.failures)} threshold(s) not met")
    console.print(f"registered [bold]{result.name}[/bold] version {result.version} ({result.gate.summary()})")
    console.print(f"next: medsight registry promote {result.name} {result.version} --alias production")


@registry_app.command("list")
def list_command(
    name: Annotated[str | None, typer.Option(help="Only this registered model.")] = None,
    tracking_uri: TrackingOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Registered versions, newest first, with aliases and headline metrics."""
    from medsight.platform.model_registry import list_versions

    try:
        versions = list_versions(name, tracking_uri=tracking_uri)
    except _errors() as error:
        _fail(str(error))
    if as_json:
        out.print_json(data=[v.to_dict() for v in versions])
        return
    if not versions:
        console.print("no registered models yet (register one with `medsight registry register`)")
        return
    table = Table("model", "version", "aliases", "created (UTC)", "seg_dice", "closed acc", "git")
    for v in versions:
        created = datetime.fromtimestamp(v.created / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
        metric = lambda key: f"{float(v.tags[key]):.3f}" if key in v.tags else "-"  # noqa: E731
        table.add_row(v.name, v.version, ", ".join(v.aliases) or "-", created, metric("eval.seg_dice"),
                      metric("eval.closed_accuracy"), v.tags.get("git.commit", "-")[:7])
    out.print(table)


@registry_app.command("show")
def show_command(
    name: str,
    version: Annotated[str, typer.Argument(help="Version number or alias (e.g. production).")],
    tracking_uri: TrackingOpt = None,
) -> None:
    """One version: aliases, lineage tags, source run and where its files are."""
    from medsight.platform.model_registry import download_uri, show_version

    try:
        info = show_version(name, version, tracking_uri=tracking_uri)
        location = download_uri(name, info.version, tracking_uri=tracking_uri)
    except _errors() as error:
        _fail(str(error))
    out.print_json(data={**info.to_dict(), "files": location, "serve": f"medsight serve --model models:/{name}/{info.version}"})


@registry_app.command("promote")
def promote_command(
    name: str,
    version: Annotated[str, typer.Argument(help="Version number (or an alias to copy from).")],
    alias: Annotated[str, typer.Option(help="Alias to move onto the version.")] = "production",
    tracking_uri: TrackingOpt = None,
) -> None:
    """Point an alias (default: production) at a version."""
    from medsight.platform.model_registry import RegistryError, check_alias, promote, show_version

    try:
        check_alias(alias)
    except RegistryError as error:
        _fail(str(error), 2)
    try:
        previous = promote(name, version, alias, tracking_uri=tracking_uri)
        now = show_version(name, alias, tracking_uri=tracking_uri).version
    except _errors() as error:
        _fail(str(error))
    moved = f"(was version {previous})" if previous and previous != now else "(new alias)" if not previous else "(unchanged)"
    console.print(f"{name}@{alias} -> version {now} {moved}")


@registry_app.command("deploy")
def deploy_command(
    name: str,
    version: Annotated[str, typer.Argument(help="Version number or alias.")],
    overlay: Annotated[str, typer.Option(help="gpu | cpu")] = "gpu",
    manifests: Annotated[Path, typer.Option(help="The serving kustomize tree of a checkout.")] = Path("manifests/serving"),
    artifacts_destination: Annotated[str | None, typer.Option(help="s3:// root of a proxied MLflow artifact store (default: $MEDSIGHT_MLFLOW_ARTIFACTS_URI).")] = None,
    service_name: Annotated[str | None, typer.Option(help="InferenceService name (default: medsight).")] = None,
    image: Annotated[str | None, typer.Option(help="Container image (default: the overlay's).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the YAML here instead of stdout.")] = None,
    apply: Annotated[bool, typer.Option(help="kubectl apply it (current kube context).")] = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Render the KServe InferenceService for a registered version (and apply it with --apply)."""
    from medsight.io_utils import atomic_write_text
    from medsight.platform.deploy import ARTIFACTS_ENV, deploy

    try:
        text = deploy(name, version, overlay=overlay, manifests=manifests, tracking_uri=tracking_uri,
                      artifacts_destination=artifacts_destination or os.environ.get(ARTIFACTS_ENV),
                      service_name=service_name, image=image, apply=apply)
    except _errors() as error:
        _fail(str(error))
    if output:
        atomic_write_text(output, text)
        console.print(f"InferenceService written: {output}")
    elif not apply:
        out.print(text, markup=False, highlight=False)
    if apply:
        console.print(f"applied; watch it with: kubectl get inferenceservice {service_name or 'medsight'} -n medsight -w")
