"""Prometheus metrics labelled per adapter: requests, errors, TTFT, inter-token and e2e latency;
and the process's garbage-collector pauses, which stop every stream at once."""

from __future__ import annotations

import contextlib
import gc
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
        self.kv_pool_tokens = Gauge(
            "loraland_kv_pool_tokens", "Tokens the GPU's KV cache holds (0: no pool)", registry=r
        )
        r.register(GcCollector())
        GC_WATCH.install()

    def render(self, stats: dict) -> bytes:
        self.running.set(stats.get("running", 0))
        self.queued.set(stats.get("queued", 0))
        self.adapters_loaded.set(stats.get("adapters_loaded", 0))
        self.kv_pool_tokens.set(stats.get("kv_pool_tokens") or 0)
        return generate_latest(self.registry)

    def error(self, adapter: str, kind: str, status: int) -> None:
        self.errors.labels(adapter, kind, str(status)).inc()


ABORTED = "abort"
"""The ``finish`` label of a request whose client left (or was cancelled) before it ended."""


class RequestOutcome:
    """Shared by the generations of one request (``n`` > 1, fan-out): once one has failed, the
    others it takes down with it did not abort (the failure is counted as an error)."""

    failed = False


class RequestTimer:
    """Times one request as the server sees it: TTFT and the gap between token-bearing chunks."""

    def __init__(
        self, metrics: Metrics, adapter: str, endpoint: str, outcome: RequestOutcome | None = None
    ):
        self.metrics, self.adapter, self.endpoint = metrics, adapter, endpoint
        self.outcome = outcome or RequestOutcome()
        self.itl = metrics.itl.labels(adapter)  # once, not once a chunk
        self.start = time.perf_counter()
        self.last: float | None = None

    def chunk(self, n_tokens: int) -> None:
        if n_tokens == 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.labels(self.adapter).observe(now - self.start)
        else:
            self.itl.observe((now - self.last) / n_tokens)
        self.last = now

    def finish(self, finish_reason: str, usage) -> None:
        m, a = self.metrics, self.adapter
        m.requests.labels(a, self.endpoint, finish_reason).inc()
        m.e2e.labels(a).observe(time.perf_counter() - self.start)
        if usage is not None:
            m.prompt_tokens.labels(a).inc(usage.prompt_tokens)
            m.generation_tokens.labels(a).inc(usage.completion_tokens)


class GcWatch:
    """Every garbage collection of this process, timed: (count, seconds, longest) per
    generation. A full collection walks every tracked object — with a model's libraries loaded,
    hundreds of thousands — and every stream waits meanwhile."""

    def __init__(self) -> None:
        self.by_generation = {generation: (0, 0.0, 0.0) for generation in range(3)}
        self.began: float | None = None

    def install(self) -> None:
        if self.on_collection not in gc.callbacks:
            gc.callbacks.append(self.on_collection)

    @contextlib.contextmanager
    def paused(self):
        """Collections meanwhile are not counted (the one at start-up, before freezing)."""
        installed = self.on_collection in gc.callbacks
        if installed:
            gc.callbacks.remove(self.on_collection)
        try:
            yield
        finally:
            if installed:
                gc.callbacks.append(self.on_collection)

    def on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.began = time.perf_counter()
            return
        if self.began is None:
            return
        pause, self.began = time.perf_counter() - self.began, None
        count, total, longest = self.by_generation[info["generation"]]
        self.by_generation[info["generation"]] = (count + 1, total + pause, max(longest, pause))

    def full(self) -> tuple[int, float]:
        """Full (generation 2) collections so far and the seconds they took."""
        count, total, _ = self.by_generation[2]
        return count, total


GC_WATCH = GcWatch()
"""One per process: the collector's callbacks are process-wide."""


class GcCollector:
    """``GC_WATCH`` in ``/metrics`` at each scrape: collections and pause seconds per generation
    (counters), the longest pause and the frozen objects (gauges)."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        label = ["generation"]
        count = CounterMetricFamily("loraland_gc_collections", "Garbage collections", labels=label)
        paused = CounterMetricFamily(
            "loraland_gc_pause_seconds",
            "Time the garbage collector stopped the process",
            labels=label,
        )
        longest = GaugeMetricFamily(
            "loraland_gc_pause_max_seconds", "The longest garbage-collector pause", labels=label
        )
        for generation, (n, total, most) in list(GC_WATCH.by_generation.items()):
            count.add_metric([str(generation)], n)
            paused.add_metric([str(generation)], total)
            longest.add_metric([str(generation)], most)
        frozen = GaugeMetricFamily(
            "loraland_gc_frozen_objects",
            "Objects moved out of the collector's sight at start-up (server.freeze_heap)",
            value=gc.get_freeze_count(),
        )
        return [count, paused, longest, frozen]


def freeze_heap() -> int:
    """Collect once, then move every object alive now (the engine, the model's libraries, the
    app) to the collector's permanent generation: later collections, full ones too, walk only
    what requests allocate. Returns how many objects were frozen."""
    with GC_WATCH.paused():  # a start-up pause, not one a request waits out
        gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
