"""Submit a compiled pipeline (KFP IR YAML) to a Kubeflow Pipelines endpoint.

`submit_pipeline` checks the package and the parameters locally first (a typo in a parameter
name fails here, naming the key, instead of as a failed run), then calls
``kfp.Client(host=...).create_run_from_pipeline_package`` and returns the run id and UI URL.
The bearer token comes from ``--token-file`` or ``KFP_BEARER_TOKEN`` and is never printed.

`submit_command` is the typer command the CLI mounts (``medsight platform submit ...``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

TOKEN_ENV = "KFP_BEARER_TOKEN"
HOST_ENV = "KFP_HOST"


class SubmitError(RuntimeError):
    """A submission problem the user can fix (bad file, parameter, endpoint or token)."""


class SubmitUsageError(SubmitError):
    """The command line itself is wrong (file, parameter, host, token file): exit code 2."""


@dataclass(frozen=True)
class SubmitResult:
    run_id: str
    run_url: str
    experiment: str
    run_name: str


@dataclass(frozen=True)
class PipelinePackage:
    path: Path
    name: str
    # Declared root parameters: name -> KFP parameterType (STRING, NUMBER_INTEGER, ...).
    parameters: Mapping[str, str]


def load_pipeline_package(path: Path) -> PipelinePackage:
    """Read and sanity-check a compiled pipeline; errors name the file and what is wrong."""
    if not path.exists():
        raise SubmitUsageError(f"pipeline package {path} does not exist (compile it first)")
    if not path.is_file():
        raise SubmitUsageError(f"pipeline package {path} is not a file")
    try:
        # kfp-kubernetes appends a second document with the platform spec.
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SubmitUsageError(f"pipeline package {path} is not valid YAML: {exc}") from exc
    if not docs or not isinstance(docs[0], dict):
        raise SubmitUsageError(f"pipeline package {path} is empty or not a YAML mapping")
    spec = docs[0]
    missing = [key for key in ("pipelineInfo", "root", "deploymentSpec") if key not in spec]
    if missing:
        raise SubmitUsageError(
            f"pipeline package {path} is not a compiled KFP pipeline: missing {', '.join(missing)}"
        )
    params = (spec["root"].get("inputDefinitions") or {}).get("parameters") or {}
    types = {name: str(p.get("parameterType", "STRING")) for name, p in params.items()}
    return PipelinePackage(path, str(spec["pipelineInfo"].get("name", path.stem)), types)


def _convert(key: str, raw: str, kfp_type: str) -> Any:
    """Parse a `key=value` string to the parameter's declared KFP type."""
    try:
        if kfp_type == "NUMBER_INTEGER":
            return int(raw)
        if kfp_type == "NUMBER_DOUBLE":
            return float(raw)
        if kfp_type == "BOOLEAN":
            lowered = raw.strip().lower()
            if lowered not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(raw)
            return lowered in {"true", "1", "yes"}
        if kfp_type in {"LIST", "STRUCT"}:
            value = yaml.safe_load(raw)
            expected = list if kfp_type == "LIST" else dict
            if not isinstance(value, expected):
                raise ValueError(raw)
            return value
    except (ValueError, yaml.YAMLError) as exc:
        raise SubmitUsageError(f"parameter {key}={raw!r}: not a valid {kfp_type}") from exc
    return raw


def parse_params(items: Sequence[str], package: PipelinePackage) -> dict[str, Any]:
    """`["epochs=3", "preset=full"]` -> typed arguments, checked against the pipeline's inputs."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SubmitUsageError(f"parameter {item!r}: expected KEY=VALUE")
        if key not in package.parameters:
            known = ", ".join(sorted(package.parameters)) or "(none)"
            raise SubmitUsageError(
                f"parameter {key!r} is not an input of pipeline {package.name} ({package.path}); "
                f"known: {known}"
            )
        args[key] = _convert(key, raw, package.parameters[key])
    return args


def resolve_token(token_file: Path | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """Bearer token from a file (e.g. a projected ServiceAccount token) or KFP_BEARER_TOKEN."""
    environ = os.environ if environ is None else environ
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise SubmitUsageError(f"token file {token_file}: {exc.strerror or exc}") from exc
        if not token:
            raise SubmitUsageError(f"token file {token_file} is empty")
        return token
    return environ.get(TOKEN_ENV) or None


def run_url(host: str, run_id: str, ui_host: str | None = None) -> str:
    return f"{(ui_host or host).rstrip('/')}/#/runs/details/{run_id}"


def make_client(host: str, token: str | None, namespace: str | None) -> Any:
    """A kfp.Client; its constructor already calls the endpoint's healthz."""
    import kfp  # imported here: the rest of medsight must not pay for kfp's import

    kwargs: dict[str, Any] = {"host": host, "existing_token": token}
    if namespace:
        kwargs["namespace"] = namespace
    return kfp.Client(**kwargs)


def _endpoint_error(host: str, exc: BaseException) -> SubmitError | None:
    """Translate transport/API failures into a message about the endpoint (never the token)."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ApiException):
        if exc.status in (401, 403):
            return SubmitError(
                f"KFP endpoint {host} refused the request (HTTP {exc.status}): set {TOKEN_ENV} "
                "or --token-file to a valid bearer token"
            )
        return SubmitError(f"KFP endpoint {host} returned HTTP {exc.status}: {exc.reason}")
    if isinstance(exc, (HTTPError, OSError)):
        return SubmitError(f"KFP endpoint {host} is unreachable: {type(exc).__name__}: {exc}")
    return None


def submit_pipeline(
    package_path: Path,
    *,
    host: str,
    experiment: str = "medsight",
    run_name: str | None = None,
    params: Sequence[str] = (),
    namespace: str | None = None,
    service_account: str | None = None,
    enable_caching: bool | None = None,
    token: str | None = None,
    ui_host: str | None = None,
    client_factory: Callable[[str, str | None, str | None], Any] | None = None,
) -> SubmitResult:
    """Validate, connect, create the run. `client_factory(host, token, namespace)` is injectable."""
    if not host.startswith(("http://", "https://")):
        raise SubmitUsageError(f"KFP host {host!r} must start with http:// or https://")
    package = load_pipeline_package(package_path)
    arguments = parse_params(params, package)
    name = run_name or package.name
    factory = client_factory or make_client
    try:
        client = factory(host, token, namespace)
        result = client.create_run_from_pipeline_package(
            str(package_path),
            arguments=arguments,
            run_name=name,
            experiment_name=experiment,
            namespace=namespace,
            enable_caching=enable_caching,
            service_account=service_account,
        )
    except Exception as exc:  # noqa: BLE001 - narrowed by _endpoint_error, else re-raised
        translated = _endpoint_error(host, exc)
        if translated is None:
            raise
        raise translated from exc
    run_id = getattr(result, "run_id", None)
    if not run_id:
        raise SubmitError(f"KFP endpoint {host} accepted the run but returned no run id")
    return SubmitResult(str(run_id), run_url(host, str(run_id), ui_host), experiment, name)


def submit_command(
    pipeline: Path = typer.Argument(..., help="compiled pipeline YAML (pipelines/compiled/...)"),
    host: str = typer.Option(..., "--host", envvar=HOST_ENV, help="KFP API endpoint URL"),
    experiment: str = typer.Option("medsight", "--experiment", help="KFP experiment name"),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="defaults to the pipeline name"),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="pipeline input KEY=VALUE"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="multi-user KFP profile namespace"),
    service_account: Optional[str] = typer.Option(
        None, "--service-account", help="run pods as this SA (e.g. medsight-pipeline-runner)"
    ),
    caching: Optional[bool] = typer.Option(None, "--caching/--no-caching", help="override compiled caching"),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file", help=f"file holding the bearer token (default: ${TOKEN_ENV})"
    ),
    ui_host: Optional[str] = typer.Option(None, "--ui-host", help="UI base URL if not the API host"),
) -> None:
    """Submit a compiled pipeline to Kubeflow Pipelines and print the run id and UI URL."""
    try:
        result = submit_pipeline(
            pipeline,
            host=host,
            experiment=experiment,
            run_name=run_name,
            params=param or [],
            namespace=namespace,
            service_account=service_account,
            enable_caching=caching,
            token=resolve_token(token_file),
            ui_host=ui_host,
        )
    except SubmitError as exc:
        typer.echo(f"error: {exc}", err=True)
        # 2: the command line is wrong; 1: the endpoint failed (click reserves 2 for usage errors).
        raise typer.Exit(code=2 if isinstance(exc, SubmitUsageError) else 1) from exc
    typer.echo(f"run_id: {result.run_id}")
    typer.echo(f"run_url: {result.run_url}")
