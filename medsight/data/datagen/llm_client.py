"""A small client for any OpenAI-compatible chat-completions endpoint (stdlib only).

Configuration from the environment (so keys never land in configs or logs):
``MEDSIGHT_LLM_BASE_URL`` (e.g. ``https://api.openai.com/v1`` or a local vLLM server),
``MEDSIGHT_LLM_MODEL``, ``MEDSIGHT_LLM_API_KEY`` (``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` are
read as fallbacks), ``MEDSIGHT_LLM_RPM`` (requests per minute, default 60).

Transient failures (HTTP 408/409/429/5xx, connection errors, timeouts) are retried with
exponential backoff that honours ``Retry-After``; other HTTP errors (a bad key, an unknown
model) fail at once with the server's message. Requests are spaced to stay under the rate.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class LLMError(RuntimeError):
    """The endpoint failed for good (after retries, or with a non-retryable error)."""


@dataclass
class ChatClient:
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    requests_per_minute: float = 60.0
    # Injected in tests so retries and rate limiting run without real waiting.
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _last_request: float | None = field(default=None, init=False, repr=False)
    requests_sent: int = field(default=0, init=False)

    @classmethod
    def from_env(cls, **overrides: Any) -> ChatClient:
        base = os.environ.get("MEDSIGHT_LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        model = os.environ.get("MEDSIGHT_LLM_MODEL")
        if not base or not model:
            raise LLMError(
                "LLM generation needs MEDSIGHT_LLM_BASE_URL (e.g. https://api.openai.com/v1) and "
                "MEDSIGHT_LLM_MODEL set in the environment (and MEDSIGHT_LLM_API_KEY if the endpoint "
                "needs one); or use the offline template generator (--generator template)"
            )
        key = os.environ.get("MEDSIGHT_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        rpm = float(os.environ.get("MEDSIGHT_LLM_RPM", "60"))
        return cls(base_url=base, model=model, api_key=key, requests_per_minute=rpm, **overrides)

    # ------------------------------------------------------------------ internals

    def _url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def _wait_for_rate_limit(self) -> None:
        if self.requests_per_minute <= 0:
            return
        interval = 60.0 / self.requests_per_minute
        now = self.clock()
        if self._last_request is not None and now - self._last_request < interval:
            self.sleep(interval - (now - self._last_request))
        self._last_request = self.clock()

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self._url(), data=json.dumps(payload).encode(), headers=headers, method="POST")
        self._wait_for_rate_limit()
        self.requests_sent += 1
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff_s, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date; fall back to exponential backoff
        return min(self.max_backoff_s, self.backoff_s * 2**attempt)

    # ------------------------------------------------------------------ API

    def complete(self, messages: list[dict[str, str]], temperature: float = 0.7, json_mode: bool = True) -> str:
        """The assistant message text for ``messages``."""
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature}
        if json_mode:
            payload["response_format"] = {"type": "json_object"}
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                body = self._post(payload)
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:500]
                if error.code not in RETRYABLE_STATUS:
                    raise LLMError(f"{self._url()}: HTTP {error.code} ({detail.strip() or error.reason}); not retried") from error
                last_problem = f"HTTP {error.code} {detail.strip()[:200]}"
                retry_after = error.headers.get("Retry-After") if error.headers else None
            except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as error:
                last_problem = f"connection problem ({getattr(error, 'reason', error)})"
            except json.JSONDecodeError as error:
                last_problem = f"response is not JSON ({error})"
            else:
                try:
                    return str(body["choices"][0]["message"]["content"])
                except (KeyError, IndexError, TypeError) as error:
                    raise LLMError(f"{self._url()}: unexpected response shape (no choices[0].message.content): {str(body)[:300]}") from error
            if attempt < self.max_retries:
                self.sleep(self._delay(attempt, retry_after))
        raise LLMError(f"{self._url()}: gave up after {self.max_retries + 1} attempts; last problem: {last_problem}")


def parse_json_reply(text: str) -> dict[str, Any]:
    """The JSON object in a reply, tolerating code fences or prose around it."""
    cleaned = text.strip()
    if cleaned.startswith("```"):
        cleaned = cleaned.strip("`")
        cleaned = cleaned[cleaned.find("{") :] if "{" in cleaned else cleaned
    start, end = cleaned.find("{"), cleaned.rfind("}")
    if start < 0 or end <= start:
        raise ValueError(f"no JSON object in reply: {text[:200]!r}")
    value = json.loads(cleaned[start : end + 1])
    if not isinstance(value, dict):
        raise ValueError(f"reply JSON is not an object: {text[:200]!r}")
    return value
