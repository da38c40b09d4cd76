"""Assemble and run the model server: KServe's ModelServer plus MedSIGHT's routes and guards.

KServe provides the app, the Open Inference Protocol routes (``/v2/...``), liveness/readiness
(``/v2/health/live``, ``/v2/health/ready``) and ``/metrics``. Added on the same app: the web
page at ``/`` (static files under ``/static``), the OpenAI-compatible chat route, request
metrics, optional bearer auth and the body-size cap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medsight.model.input_limits import InputLimitError, InputLimits

logger = logging.getLogger(__name__)
TOKEN_ENV = "MEDSIGHT_SERVE_TOKEN"


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "medsight"
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    device: str = "cpu"
    limits: InputLimits = InputLimits()
    token: str | None = None  # from MEDSIGHT_SERVE_TOKEN, never from the command line


@contextmanager
def _argv_for_kserve():
    """``kserve.model_server`` parses ``sys.argv`` when imported (argparse, prefixes allowed):
    our own options such as ``--model`` would be read as its ``--model_name``."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def import_kserve():
    with _argv_for_kserve():
        import kserve
        import kserve.model_server

    return kserve


def _page_routes(app) -> None:
    from importlib import resources

    from fastapi.responses import HTMLResponse
    from starlette.staticfiles import StaticFiles

    page = resources.files("medsight.serve").joinpath("static/index.html").read_text()
    headers = {
        # Everything the page loads comes from this server: no CDN, no inline script.
        "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
    }
    app.add_api_route("/", lambda: HTMLResponse(page, headers=headers), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(packages=[("medsight.serve", "static")]), name="static")


def _disable_repository_api(app) -> None:
    """KServe's model-repository routes let any caller unload the model; this server serves
    one fixed model, so they answer 404 (registered before KServe's, so they win)."""
    from fastapi.responses import JSONResponse

    def disabled(model_name: str) -> JSONResponse:
        return JSONResponse({"error": "the model repository API is disabled on this server"}, status_code=404)

    for action in ("load", "unload"):
        app.add_api_route(f"/v2/repository/models/{{model_name}}/{action}", disabled, methods=["POST"], include_in_schema=False)


def _error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from medsight.data.errors import DataError
    from medsight.serve.middleware import error_body

    async def limit_error(request, error: InputLimitError):
        return JSONResponse(error_body(request.url.path, 413, str(error)), status_code=413)

    async def data_error(request, error: DataError):
        return JSONResponse(error_body(request.url.path, 400, str(error)), status_code=400)

    async def validation_error(request, error: RequestValidationError):
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            detail = next(p for p in problems if p.get("type") == "json_invalid")
            reason = (detail.get("ctx") or {}).get("error", "JSON decode error")
            return JSONResponse(error_body(request.url.path, 400, f"request body is not valid JSON ({reason})"), status_code=400)
        first = problems[0] if problems else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where or 'request'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(request.url.path, 422, message), status_code=422)

    app.add_exception_handler(InputLimitError, limit_error)
    app.add_exception_handler(DataError, data_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def load_model(source: str, device: str = "cpu", cache: Path | None = None):
    """``source``: a package directory, a stage output (base from its stage.json), or a
    ``models:/name/version`` (or ``models:/name@alias``) URI of the MLflow registry."""
    from medsight.serve.package import PackageError, load_package, locate_package

    if source.startswith("models:/"):
        from medsight.platform.model_registry import download_model

        return load_package(download_model(source, cache), device)
    path = Path(source)
    if not path.exists():
        raise PackageError(f"{path}: no such directory (a model package, an instruct-tune output, or models:/NAME/VERSION)")
    try:
        root = locate_package(path)
    except PackageError:
        root = None
    if root is not None:
        return load_package(root, device)
    from medsight.model.inference import MedSightInference

    from medsight.platform.resolve import ResolveError, resolve_input

    try:
        base = resolve_input(path, "base")
    except ResolveError as error:
        raise PackageError(f"{path}: not a model package, and its base-models input cannot be found ({error}); "
                           "build a package with `medsight registry package`") from None
    return MedSightInference.load(path, base, device=device)


def build_app(model, config: ServeConfig):
    """Register routes, guards and the model on KServe's app; returns (server, kserve model)."""
    kserve = import_kserve()
    from kserve.model_server import app

    from medsight.serve.batching import MicroBatcher
    from medsight.serve.engine import GroundingEngine
    from medsight.serve.kserve_model import MedSightModel
    from medsight.serve.metrics import ServeMetrics
    from medsight.serve.middleware import BearerAuthMiddleware, BodyLimitMiddleware, RequestMetricsMiddleware
    from medsight.serve.openai_api import chat_completions_route

    metrics = ServeMetrics()
    engine = GroundingEngine(model, config.limits)
    batcher = MicroBatcher(
        engine.run_batch,
        max_batch_size=config.max_batch_size,
        max_wait_ms=config.max_wait_ms,
        on_queue_depth=metrics.queue_depth.set,
        on_batch=lambda stats: metrics.observe_batch(stats.size, stats.seconds),
    )
    served = MedSightModel(config.model_name, engine, batcher, metrics)
    # Ours first: Starlette serves the first matching route, and KServe adds its "/" later.
    _page_routes(app)
    app.add_api_route("/v1/chat/completions", chat_completions_route({config.model_name: served}), methods=["POST"])
    _disable_repository_api(app)
    _error_handlers(app)
    # Added last = outermost: metrics see every response, auth runs before the body is read.
    app.add_middleware(BodyLimitMiddleware, limits=config.limits)
    if config.token:
        app.add_middleware(BearerAuthMiddleware, token=config.token)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    server = LoopbackModelServer(
        host=config.host, http_port=config.port, enable_grpc=False, workers=1, enable_latency_logging=False
    )
    return server, served


def _server_class():
    kserve = import_kserve()
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    class _LoopbackModelServer(kserve.ModelServer):
        """KServe's server with a configurable bind address: KServe binds 0.0.0.0 (right in a
        pod, where the InferenceService passes --host 0.0.0.0); local runs and tests bind
        loopback only."""

        def __init__(self, host: str, **kwargs):
            super().__init__(**kwargs)
            self.host = host

        def start(self, models) -> None:
            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = RESTServer(
                FASTAPI_APP_IMPORT_STRING,
                self.dataplane,
                self.model_repository_extension,
                self.http_port,
                workers=1,
                grace_period=self.grace_period,
                event_loop=self.event_loop,
                timeout_keep_alive=self.timeout_keep_alive,
            )
            self._rest_server.config.host = self.host
            self.servers.append(self._rest_server.start())
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

    return _LoopbackModelServer


def LoopbackModelServer(host: str, **kwargs):  # noqa: N802 - builds the class on first use: kserve imports late
    return _server_class()(host, **kwargs)


def serve(source: str, config: ServeConfig, cache: Path | None = None) -> None:
    """Load the model, then serve until SIGTERM/SIGINT."""
    if config.token is None and os.environ.get(TOKEN_ENV):
        config = ServeConfig(**{**config.__dict__, "token": os.environ[TOKEN_ENV]})
    model = load_model(source, config.device, cache)
    server, served = build_app(model, config)
    logger.info("serving %s on http://%s:%d (auth %s)", config.model_name, config.host, config.port, "on" if config.token else "off")
    server.start([served])
