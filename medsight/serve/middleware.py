"""ASGI middleware in front of the KServe app: request metrics, bearer auth, body-size cap.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so a refused request is answered before its
body is read, and the body cap counts the bytes actually received, not only Content-Length.
Error bodies follow the endpoint's protocol: ``{"error": {"message", "type", "code"}}`` on the
OpenAI route, ``{"error": "..."}`` (KServe's shape) everywhere else.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import unquote

from medsight.model.input_limits import InputLimitError, InputLimits
from medsight.serve.metrics import ServeMetrics

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
TOKEN_COOKIE = "medsight_token"
# Probes must work without credentials; nothing else does when a token is set.
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
OPENAI_PREFIX = "/v1/chat/"


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    if path.startswith(OPENAI_PREFIX):
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        return {"error": {"message": message, "type": kind, "code": status}}
    return {"error": message}


async def send_json(send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestMetricsMiddleware:
    """Counts every response (including those refused by the layers below) and its latency."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.observe_request(scope["path"], status[0], time.perf_counter() - started)


class BearerAuthMiddleware:
    """With a token configured, every path but the health probes needs ``Authorization: Bearer``
    (API clients) or the ``medsight_token`` cookie (the web page, set by its login form)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the serving token must be at least 16 characters")
        self.app, self.token = app, token.encode()

    def _presented(self, scope: dict) -> bytes | None:
        authorization = _header(scope, b"authorization") or ""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip().encode()
        cookie = _header(scope, b"cookie")
        if cookie:
            try:
                jar = SimpleCookie(cookie)
            except CookieError:
                return None
            if TOKEN_COOKIE in jar:
                return unquote(jar[TOKEN_COOKIE].value).encode()
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:
            return await self.app(scope, receive, send)
        presented = self._presented(scope)
        if presented is not None and hmac.compare_digest(presented, self.token):
            return await self.app(scope, receive, send)
        challenge = [(b"www-authenticate", b'Bearer realm="medsight"')]
        if scope["path"] == "/" and "text/html" in (_header(scope, b"accept") or ""):
            page = resources.files("medsight.serve").joinpath("static/login.html").read_bytes()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(page)).encode()),
                (b"content-security-policy", b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"),
                *challenge]})
            await send({"type": "http.response.body", "body": page})
            return
        message = "missing or wrong bearer token: send 'Authorization: Bearer <token>'" if presented is None else "wrong bearer token"
        await send_json(send, 401, error_body(scope["path"], 401, message), challenge)


class BodyLimitMiddleware:
    """Refuses bodies over ``limits.max_body_bytes`` with 413, reading at most that many bytes."""

    def __init__(self, app: ASGIApp, limits: InputLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        try:
            declared = _header(scope, b"content-length")
            if declared is not None and declared.isdigit():
                self.limits.check_body(int(declared))
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                self.limits.check_body(size)
                chunks.append(chunk)
                more = message.get("more_body", False)
        except InputLimitError as error:
            await send_json(send, 413, error_body(scope["path"], 413, str(error)), [(b"connection", b"close")])
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect like the server would

        await self.app(scope, replay, send)
