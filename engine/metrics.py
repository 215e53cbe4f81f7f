"""Prometheus metrics labelled per adapter: requests, errors, TTFT, inter-token and e2e latency."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    """One registry per server, so several servers (tests) can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["adapter"]
        r = self.registry
        self.requests = Counter(
            "loraland_requests", "Finished requests", [*labels, "endpoint", "finish"], registry=r
        )
        self.errors = Counter(
            "loraland_request_errors",
            "Failed requests, by OpenAI error type and HTTP status",
            [*labels, "type", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "loraland_time_to_first_token_seconds",
            "TTFT",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraland_inter_token_latency_seconds", "Time between streamed tokens", labels,
            buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "loraland_e2e_request_latency_seconds", "Request latency", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("loraland_prompt_tokens", "Prompt tokens", labels, registry=r)
        self.generation_tokens = Counter(
            "loraland_generation_tokens", "Generated tokens", labels, registry=r
        )
        self.running = Gauge("loraland_requests_running", "Requests being generated", registry=r)
        self.queued = Gauge("loraland_requests_waiting", "Requests waiting for a slot", registry=r)
        self.adapters_loaded = Gauge("loraland_adapters_loaded", "Adapters loaded", registry=r)

    def render(self, stats: dict) -> bytes:
        self.running.set(stats.get("running", 0))
        self.queued.set(stats.get("queued", 0))
        self.adapters_loaded.set(stats.get("adapters_loaded", 0))
        return generate_latest(self.registry)

    def error(self, adapter: str, kind: str, status: int) -> None:
        self.errors.labels(adapter, kind, str(status)).inc()


class RequestTimer:
    """Times one request as the server sees it: TTFT and the gap between token-bearing chunks."""

    def __init__(self, metrics: Metrics, adapter: str, endpoint: str):
        self.metrics, self.adapter, self.endpoint = metrics, adapter, endpoint
        self.start = time.perf_counter()
        self.last: float | None = None

    def chunk(self, n_tokens: int) -> None:
        if n_tokens == 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.labels(self.adapter).observe(now - self.start)
        else:
            self.metrics.itl.labels(self.adapter).observe((now - self.last) / n_tokens)
        self.last = now

    def finish(self, finish_reason: str, usage) -> None:
        m, a = self.metrics, self.adapter
        m.requests.labels(a, self.endpoint, finish_reason).inc()
        m.e2e.labels(a).observe(time.perf_counter() - self.start)
        if usage is not None:
            m.prompt_tokens.labels(a).inc(usage.prompt_tokens)
            m.generation_tokens.labels(a).inc(usage.completion_tokens)
