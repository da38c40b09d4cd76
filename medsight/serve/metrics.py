"""Prometheus metrics of the model server: requests, latency, queue depth, batches and tokens.

The metric objects belong to one ``ServeMetrics`` instance (no module-level state); the server
registers it in prometheus_client's default registry, which KServe exposes at ``/metrics``
alongside its own ``request_*_seconds`` histograms.
"""

from __future__ import annotations

import re

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_ENDPOINTS = (
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$"), "infer"),
    (re.compile(r"^/v1/chat/completions$"), "chat_completions"),
    (re.compile(r"^/v1/models/[^/]+:predict$"), "v1_predict"),
    (re.compile(r"^/v2/health/(live|ready)$|^/v2/models/[^/]+/ready$"), "health"),
    (re.compile(r"^/v2(/models(/[^/]+)?)?/?$"), "metadata"),
    (re.compile(r"^/metrics$"), "metrics"),
    (re.compile(r"^/(static/.*)?$"), "page"),
)
# Seconds: a tiny model on CPU answers in ~0.1-1 s, the 8B one on a GPU in a few seconds.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def endpoint_label(path: str) -> str:
    """A bounded label for a request path (raw paths would let clients create label values)."""
    for pattern, label in _ENDPOINTS:
        if pattern.match(path):
            return label
    return "other"


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.requests = Counter(
            "medsight_requests", "HTTP requests by endpoint and status code", ["endpoint", "code"], registry=registry
        )
        self.latency = Histogram(
            "medsight_request_latency_seconds", "Time from request to response", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.queue_depth = Gauge("medsight_queue_depth", "Requests waiting for the model", registry=registry)
        self.batch_size = Histogram(
            "medsight_batch_size", "Requests answered per model call", buckets=(1, 2, 4, 8, 16, 32), registry=registry
        )
        self.batch_seconds = Histogram(
            "medsight_batch_seconds", "Model time per batch", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.prompt_tokens = Counter("medsight_prompt_tokens", "Question tokens received", registry=registry)
        self.generated_tokens = Counter("medsight_generated_tokens", "Tokens generated", registry=registry)
        self.region_tokens = Counter("medsight_region_tokens", "Region tokens generated (= masks returned)", registry=registry)

    def observe_request(self, path: str, code: int, seconds: float) -> None:
        endpoint = endpoint_label(path)
        self.requests.labels(endpoint=endpoint, code=str(code)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_answer(self, prompt_tokens: int, generated_tokens: int, region_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)
        self.region_tokens.inc(region_tokens)
