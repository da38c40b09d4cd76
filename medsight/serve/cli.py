"""``medsight serve``: run the KServe model server (API + web page) for a trained model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def serve_command(
    model: Annotated[str, typer.Option(help="Model package dir, instruct-tune output dir, or models:/NAME/VERSION (also models:/NAME@ALIAS).")],
    host: Annotated[str, typer.Option(help="Bind address (0.0.0.0 inside a pod).")] = "127.0.0.1",
    port: int = 8080,
    name: Annotated[str, typer.Option(help="Model name in the API paths (/v2/models/NAME/infer) and the OpenAI 'model' field.")] = "medsight",
    device: str = "cpu",
    max_batch_size: Annotated[int, typer.Option(help="Most requests answered in one model call.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="How long a lone request waits for others to batch with.")] = 5.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body.")] = 64.0,
    max_image_pixels: Annotated[int, typer.Option(help="Largest image (height x width).")] = 50_000_000,
    max_question_tokens: int = 512,
    max_question_chars: int = 4000,
    cache: Annotated[Path | None, typer.Option(help="Where models:/ URIs are downloaded (default: a temp dir).")] = None,
) -> None:
    """Serve a model: Open Inference Protocol, OpenAI /v1/chat/completions, a web page at /.

    Set MEDSIGHT_SERVE_TOKEN to require 'Authorization: Bearer <token>' on every endpoint but
    /v2/health/live and /v2/health/ready (the token is read from the environment so it never
    shows in process lists or shell history).
    """
    from medsight.data.errors import DataError
    from medsight.model.input_limits import InputLimits
    from medsight.serve.server import TOKEN_ENV, ServeConfig, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        limits = InputLimits(
            max_body_bytes=int(max_body_mb * 2**20),
            max_image_pixels=max_image_pixels,
            max_question_chars=max_question_chars,
            max_question_tokens=max_question_tokens,
        )
        config = ServeConfig(name, host, port, max_batch_size, max_wait_ms, device, limits, os.environ.get(TOKEN_ENV) or None)
        if config.token is not None and len(config.token) < 16:
            raise ValueError(f"{TOKEN_ENV} must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        if max_batch_size < 1:
            raise ValueError("--max-batch-size must be at least 1")
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    console.print(f"loading {model} ...")
    try:
        serve(model, config, cache)
    except (FileNotFoundError, DataError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
