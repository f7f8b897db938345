"""The server's metrics for Prometheus (``GET /metrics``): requests, tokens, queue depth, batch size, latency and
time to the first token. ``prometheus_client`` (the ``serve`` extra) is imported when a server makes its metrics.
"""

from __future__ import annotations

from typing import Any


class Metrics:
    """The Prometheus metrics of one server, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("gpt2scratch_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=registry)  # fmt: skip
        self.prompt_tokens = Counter("gpt2scratch_prompt_tokens", "prompt tokens of completions", registry=registry)
        self.generated_tokens = Counter("gpt2scratch_generated_tokens", "tokens generated (for clients that left too)",
                                        registry=registry)  # fmt: skip
        self.cancelled = Counter("gpt2scratch_cancelled_requests", "requests whose client left before the end",
                                 registry=registry)  # fmt: skip
        self.queue_depth = Gauge("gpt2scratch_queue_depth", "sequences waiting for the batch", registry=registry)
        self.running = Gauge("gpt2scratch_running_sequences", "sequences in the batch", registry=registry)
        self.batch_size = Histogram("gpt2scratch_batch_size", "sequences per decoding step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)  # fmt: skip
        seconds = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram("gpt2scratch_request_latency_seconds", "time from request to its last token",
                                 buckets=seconds, registry=registry)  # fmt: skip
        self.ttft = Histogram("gpt2scratch_time_to_first_token_seconds", "time from request to its first token",
                              buckets=seconds, registry=registry)  # fmt: skip


class CountRequests:
    """ASGI middleware: every answered HTTP request counted by endpoint and status."""

    def __init__(self, app: Any, metrics: Metrics, routes: tuple[str, ...]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            endpoint = scope["path"] if scope["path"] in self.routes else "other"  # a bounded set of labels
            self.metrics.requests.labels(endpoint, str(status)).inc()
