"""Load the engine directly (no HTTP): adapter-scaling sweep, evicted-adapter reload, soak.

    python -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out results/bench-h200 \
        --plan sweep,evict,soak --adapters 1,8,32,64,128 --users 32,128,256 --duration 20
    python -m loadtest.bench --config /tmp/synth7b/adapters.yaml --backend hf --plan sweep \
        --adapters 1,8 --users 32 --out results/bench-h200-peft      # the peft baseline
    python -m loadtest.bench --config /tmp/synth-tiny/adapters.yaml --backend hf --plan sweep \
        --adapters 1,2 --users 2 --duration 4 --out /tmp/bench     # CI-sized

Same clients as the Locust harness, minus the HTTP layer: each of ``users`` coroutines streams
requests back to back (random words, greedy, ``ignore_eos`` so every request makes its full
``--output-tokens``), adapters drawn uniformly from the first N of the registry; the base-only
control runs first at every concurrency, in the same process. Per point the statistics and
ratios are those of ``loadtest.sweep`` (vLLM's definitions), written the same way (results.json,
results.csv, summary.md, PNGs), so the two can be compared.

``evict`` measures what reloading an adapter costs: with more adapters in the traffic than
``max_loras_per_batch`` GPU slots, one request at a time, TTFT of an adapter that was just used
(resident) vs one that was pushed out of the GPU pool since (reloaded), and the base model.
``soak`` runs ``--soak-users`` streams over ``--soak-adapters`` adapters for ``--soak-seconds``;
a share of clients walk away mid-stream (``--disconnect``), and every ``--hotload-every``
seconds an extra adapter is loaded, used and unloaded. It reports failures, lost requests
(neither finished nor cancelled) and GPU memory / running requests before and after.
``http`` serves the OpenAI-compatible API over the same engine (uvicorn on this event loop) and
runs ``loadtest.sweep`` (Locust, another process) at ``--http-users`` × ``--http-adapters``:
``http/compare.md`` sets each point beside its direct one, with the CPU the engine process and
the clients burned, to tell whether the HTTP layer is the bottleneck.
``pairs`` repeats, ``--pairs`` times at each of ``--users`` × ``--adapters``, a round of four
points: base and adapters engine-direct (chat messages, as Locust sends), then base and adapters
through the HTTP API (Locust, as ``http``), and reports each ratio (HTTP ÷ direct, adapters ÷
base) as the median over the rounds with its range (``loadtest.pairs``; ``pairs/results.json``,
``pairs/summary.md``). Each point records the cores of the serving process and of SGLang's
scheduler and detokenizer.
``--sync-users`` makes the rounds at that concurrency start together with another job's
(``loadtest.peer`` on another GPU): touch ``--sync-mine``, wait up to ``--sync-timeout`` s for
``--sync-theirs``.

Throughput is measured in the steady window (after ``--warmup``, until the clients stop),
counting the tokens of requests cut off at the end too (``loadtest.stats.summarize``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from engine import GenerationRequest, SamplingParams, build_engine
from engine.api import create_api
from engine.api.protocol import CHAT_TEXT_FIELD
from engine.api.server import http_protocol
from engine.metrics import GC_WATCH, freeze_heap
from engine.registry import load_registry, with_overrides
from loadtest.pairs import write_pairs
from loadtest.procs import ChildrenMeter, CpuMeter, gpu_memory_mib, wait_for_peer
from loadtest.report import (
    describe,
    evict_markdown,
    http_markdown,
    http_report,
    soak_markdown,
    write_outputs,
)
from loadtest.sglang_counters import CounterTrace, multiprocess_dir
from loadtest.stats import WORDS, parse_range, percentile, point_key, ratios, summarize
from loadtest.sweep import measured, steady_window


@dataclass
class Traffic:
    """What the clients send."""

    adapters: list[str | None]
    prompt_words: tuple[int, int] = (90, 110)
    output_tokens: tuple[int, int] = (90, 110)
    seed: int = 0
    records: list[dict] = field(default_factory=list)
    chat: bool = False
    """Send the prompt as one user message (chat template applied), as the Locust user does;
    otherwise as a raw prompt (the sweeps of sessions 1-6)."""

    def request(self, rng: random.Random):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*self.prompt_words)))
        # greedy, as the Locust user asks (temperature 0): SamplingParams' default is OpenAI's 1.0
        tokens = rng.randint(*self.output_tokens)
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        text, adapter = f"Continue this text: {words}", rng.choice(self.adapters)
        if self.chat:
            message = {"role": "user", "content": text}
            return GenerationRequest(adapter=adapter, messages=[message], params=params)
        return GenerationRequest(adapter=adapter, prompt=text, params=params)


async def timed_stream(
    engine, request, leave_after: int | None = None, sink: list | None = None
) -> dict:
    """One request, timed like the Locust client; ``leave_after`` chunks → walk away.

    The record goes into ``sink`` when the request starts and fills as chunks arrive, so a
    request cut off when the clients stop still counts the tokens it streamed (marked ``cut``).
    """
    record = {
        "start": time.time(), "token_times": [], "output_tokens": 0, "ok": False,
        "cancelled": False, "cut": True, "error": None, "adapter": request.adapter,
    }  # fmt: skip
    if sink is not None:
        sink.append(record)
    t0, times = time.perf_counter(), record["token_times"]
    stream = engine.stream(request)
    try:
        async for chunk in stream:
            if chunk.token_ids:
                record.setdefault("first_event", time.perf_counter() - t0)
                record["output_tokens"] += len(chunk.token_ids)
            if chunk.text:  # what an HTTP client sees: text (a token may decode to none yet)
                times.append(time.perf_counter() - t0)
            if chunk.usage:
                record["output_tokens"] = chunk.usage.completion_tokens
            if leave_after is not None and len(times) >= leave_after:
                record["cancelled"] = True
                break
    except Exception as err:  # a failed request is a result
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        await stream.aclose()
    record |= {
        "ttft": times[0] if times else None,
        "e2e": time.perf_counter() - t0,
        "itl": [b - a for a, b in itertools.pairwise(times)],
        "ok": record["error"] is None and not record["cancelled"] and bool(times),
        "cut": False,
    }
    return record


async def closed_loop(
    engine,
    traffic: Traffic,
    users: int,
    seconds: float,
    min_completed: int = 0,
    warmup: float = 0,
    think: float = 0,
) -> tuple[list[dict], float]:
    """``users`` clients back to back (``think``: each sleeps that long after an answer, as
    Locust's ``--think-time``) for ``seconds`` — and on until ``min_completed`` requests started
    after ``warmup`` have finished, however slow the machine; requests still running then are
    cut. Returns the records and the seconds it ran."""
    began, steady_from = time.perf_counter(), time.time() + warmup
    records: list[dict] = []
    stopping = False

    async def client(i: int) -> None:
        rng = random.Random(traffic.seed * 100_003 + i)
        if think:  # arrive as Locust spawns its users (-r users: all within the first second)
            await asyncio.sleep(i / users)
        while not stopping:
            await timed_stream(engine, traffic.request(rng), sink=records)
            if think:
                await asyncio.sleep(think)

    tasks = [asyncio.create_task(client(i)) for i in range(users)]
    await asyncio.sleep(seconds)
    stopping = True
    await stop_clients(tasks, records, steady_from, min_completed)
    return records, time.perf_counter() - began


async def stop_clients(tasks, records: list[dict], steady_from: float, min_completed: int):
    """Once ``min_completed`` requests started after ``steady_from`` have finished, cut the
    requests still running."""
    while sum(r["ok"] and r["start"] >= steady_from for r in records) < min_completed:
        await asyncio.sleep(0.05)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def open_loop(
    engine,
    traffic: Traffic,
    rate: float,
    seconds: float,
    min_completed: int = 0,
    warmup: float = 0,
) -> tuple[list[dict], float]:
    """Requests arriving as a Poisson process, ``rate`` a second, each on its own whatever the
    engine's speed (Locust's ``--arrival-rate``), for ``seconds`` — and on until
    ``min_completed`` requests started after ``warmup`` have finished; requests still running
    then are cut. Returns the records and the seconds it ran."""
    began, steady_from = time.perf_counter(), time.time() + warmup
    rng = random.Random(traffic.seed)
    records: list[dict] = []
    running: set[asyncio.Task] = set()
    while time.perf_counter() - began < seconds:
        task = asyncio.create_task(timed_stream(engine, traffic.request(rng), sink=records))
        running.add(task)
        task.add_done_callback(running.discard)
        await asyncio.sleep(rng.expovariate(rate))
    await stop_clients(running, records, steady_from, min_completed)
    return records, time.perf_counter() - began


async def sweep(engine, args, names: list[str]) -> dict:
    out = Path(args.out)
    results = {"settings": settings_of(args, engine), "points": {}}
    grid = [(u, a) for u in args.users for a in [0, *args.adapters]]
    for i, (users, adapters) in enumerate(grid, 1):
        label = "base-only control" if adapters == 0 else f"{adapters} adapters"
        print(f"[{i}/{len(grid)}] {users} streams, {label}: {args.duration}s", flush=True)
        point = await direct_point(engine, args, names, users, adapters)
        point |= ratios(point, results["points"].get(point_key(users, 0), point))
        results["points"][point_key(users, adapters)] = point
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"    {describe(point)}", flush=True)
    write_outputs(results, out)
    return results


async def direct_point(
    engine, args, names: list[str], users: int, adapters: int, chat: bool = False, lag=None
) -> dict:
    """One engine-direct point: ``users`` clients over the first ``adapters`` adapters (0: the
    base), statistics in the steady window, the cores busy meanwhile and (``lag``, a running
    ``LoopLag``) the event loop's lateness."""
    traffic = Traffic(names[:adapters] or [None], args.prompt_words, args.output_tokens)
    traffic.chat = chat
    began, meter = time.time(), CpuMeter(os.getpid())
    children, collections = ChildrenMeter(os.getpid()), GC_WATCH.full()
    if rate := getattr(args, "arrival_rate", 0):  # open loop: ``users`` only names the point
        records, ran = await open_loop(
            engine, traffic, rate, args.duration, args.min_completed, args.warmup
        )
    else:
        think = getattr(args, "think_time", 0)
        records, ran = await closed_loop(
            engine, traffic, users, args.duration, args.min_completed, args.warmup, think
        )
    steady = (began + args.warmup, began + ran)
    point = {"users": users, "adapters": adapters, **summarize(records, steady)}
    if trace := getattr(args, "counter_trace", None):
        point |= trace.figures(*steady, point.get("arrived_per_s"))
    point["open_loop"] = bool(rate)
    point |= full_collections_since(collections)
    # the clients call the engine directly: its TTFT and the "server's" are theirs
    point["engine_ttft_p50"] = point["server_ttft_p50"] = point.get("ttft_p50")
    # the clients run in this process too: one event loop for both sides
    if (busy := meter.cores()["server_cpu_cores"]) is not None:
        point["engine_process_cpu_cores"] = busy
    point["engine_children_cpu_cores"] = children.cores()  # SGLang's scheduler, detokenizer
    point |= children.busiest_thread()
    point["distribution"] = "base" if adapters == 0 else "uniform"
    if lag:
        point |= lag.figures(*steady)
    return point


def locust_options(args, port: int) -> argparse.Namespace:
    """What ``loadtest.sweep.measured`` needs to run one Locust point against our API."""
    return argparse.Namespace(
        host=f"http://127.0.0.1:{port}",
        duration=round(args.duration),
        warmup=args.warmup,
        prompt_words="-".join(map(str, args.prompt_words)),
        output_tokens="-".join(map(str, args.output_tokens)),
        server_pid=os.getpid(),
        processes=args.locust_processes,
        arrival_rate=getattr(args, "arrival_rate", 0),
        think_time=getattr(args, "think_time", 0),
    )


async def http_point(
    options, users: int, adapters: int, raw: Path, clocks=None, lag=None, counters=None
) -> dict:
    """One Locust point through the API this process serves (Locust from a thread: the event
    loop goes on serving); ``clocks``: {figure: clock}, e.g. the engine's own TTFT
    (``EngineClock``) and the server's (``ServerClock``); ``lag``: a running ``LoopLag``;
    ``counters``: a running ``CounterTrace`` (SGLang's passes)."""
    clocks = clocks or {}
    children, collections = ChildrenMeter(os.getpid()), GC_WATCH.full()
    for clock in clocks.values():
        clock.samples.clear()
        getattr(clock, "first_writes", {}).clear()
    point, records = await asyncio.to_thread(measured, options, users, adapters, raw)
    point["open_loop"] = bool(getattr(options, "arrival_rate", 0))
    point["engine_children_cpu_cores"] = children.cores()
    point |= children.busiest_thread()
    if window := steady_window(records, options):  # the client's: the requests of its TTFT
        point |= {figure: clock.ttft_p50(*window) for figure, clock in clocks.items()}
        point |= lag.figures(*window) if lag else {}
        point |= counters.figures(*window, point.get("arrived_per_s")) if counters else {}
        for clock in clocks.values():
            point |= clock.hops(records, *window) if isinstance(clock, ServerClock) else {}
    return point | full_collections_since(collections)


def full_collections_since(before: tuple[int, float]) -> dict:
    """This process's full garbage collections over a point: every stream waits them out."""
    count, seconds = GC_WATCH.full()
    return {"gc_full_collections": count - before[0], "gc_full_pause_s": seconds - before[1]}


async def sync_with_peer(args, users: int) -> None:
    """Start this concurrency's rounds together with the other job (if it comes in time)."""
    if users == args.sync_users:
        await asyncio.to_thread(wait_for_peer, args)


def unhealthy(points: dict) -> list[str]:
    """Points with failed requests or no token streamed in the window."""
    return [k for k, p in points.items() if p.get("failures") or not p.get("output_throughput")]


async def pairs(engine, args, names: list[str], registry) -> dict:
    """Rounds of (base, adapters) direct, then (base, adapters) through the HTTP API."""
    out = Path(args.out) / "pairs"
    (out / "raw").mkdir(parents=True, exist_ok=True)
    engine_clock = EngineClock(engine)
    server_clock = ServerClock(create_api(engine_clock, registry))
    clocks = {"engine_ttft_p50": engine_clock, "server_ttft_p50": server_clock}
    server, serving, _ = await serve_app(server_clock, args.http_port)
    options = locust_options(args, args.http_port)
    lag = LoopLag()
    lagging = asyncio.create_task(lag.run())
    # direct clients send chat messages, as Locust does: the same tokens on both paths (the API
    # fills an adapter's template too; the synthetic registry's is "{input}", the message itself)
    settings = settings_of(args, engine) | {"pairs": args.pairs, "direct_requests": "chat"}
    settings["arrivals"] = arrivals_of(args)
    title = "Our server: engine-direct and HTTP"
    if settings["arrivals"] != "closed":
        title += f", {arrivals_of(args, title=True)}"
    results = {"settings": settings, "rounds": []}
    try:
        for users in args.users:
            await sync_with_peer(args, users)
            for adapters in args.adapters:
                for number in range(1, args.pairs + 1):
                    points = {}
                    for kind, count in [("direct-base", 0), ("direct-adapters", adapters),
                                        ("http-base", 0), ("http-adapters", adapters)]:  # fmt: skip
                        print(f"[pairs] {users} streams, round {number}, {kind}", flush=True)
                        lag.samples.clear()
                        if kind.startswith("direct"):
                            point = await direct_point(engine, args, names, users, count, True, lag)
                        else:
                            raw = out / "raw" / f"u{users}-a{count}-r{number}.jsonl"
                            trace = getattr(args, "counter_trace", None)
                            point = await http_point(options, users, count, raw, clocks, lag, trace)
                        points[kind] = point
                        print(f"    {describe(point)}", flush=True)
                    results["rounds"].append(
                        {"users": users, "adapters": adapters, "round": number, "points": points}
                    )
                    write_pairs(out, results, title)
                    if args.pairs_strict and (bad := unhealthy(points)):
                        raise RuntimeError(f"pairs: points without a clean result: {bad}")
    finally:
        lagging.cancel()
        server.should_exit = True
        await serving
    print((out / "summary.md").read_text(), flush=True)
    return results


def arrivals_of(args, title: bool = False) -> str:
    """How the clients arrive, both arms alike: "closed", "Poisson, R/s" or a think time
    (``title``: as the summary's title says it)."""
    if rate := getattr(args, "arrival_rate", 0):
        return f"Poisson arrivals {rate}/s" if title else f"Poisson, {rate}/s"
    if think := getattr(args, "think_time", 0):
        return f"{think}-s think time" if title else f"closed, {think}-s think time"
    return "closed"


async def evict(engine, args, names: list[str]) -> dict:
    """TTFT of a resident adapter vs one evicted from the GPU pool since its last use."""
    slots = engine.adapter_slots()
    ring = names[: (slots or 8) + 4]
    rng = random.Random(1)
    traffic = Traffic([None], args.prompt_words, (8, 8))

    async def ttft(adapter: str | None) -> float:
        request = traffic.request(rng)
        request.adapter = adapter
        return (await timed_stream(engine, request))["ttft"]

    rows = {"base": [], "resident": [], "reloaded": []}
    for _ in range(args.evict_rounds):
        rows["base"].append(await ttft(None))
        rows["resident"].append(await ttft(ring[0]))
        rows["resident"].append(await ttft(ring[0]))
        for name in ring[1:]:  # more distinct adapters than GPU slots: ring[0] is pushed out
            await ttft(name)
        rows["reloaded"].append(await ttft(ring[0]))
    summary = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    report = {
        "gpu_slots": slots,
        "ring": len(ring),
        "rounds": args.evict_rounds,
        "ttft_p50_s": summary,
        "reload_added_ms": round((summary["reloaded"] - summary["resident"]) * 1000, 2),
        "samples_s": rows,
    }
    (Path(args.out) / "evict.json").write_text(json.dumps(report, indent=1))
    (Path(args.out) / "evict.md").write_text(evict_markdown(report))
    print(f"evict: {json.dumps({k: v for k, v in report.items() if k != 'samples_s'})}")
    return report


async def serve_app(app, port: int = 0, http: str = "auto"):
    """Serve ``app`` with uvicorn on this event loop (``port`` 0: a free one; ``http``: uvicorn's
    HTTP implementation, "auto" as the product runs it); returns the server, its task, its URL."""
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    config = uvicorn.Config(app, port=port, log_level="warning", http=http_protocol(http))
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            raise RuntimeError(f"the API did not start on port {port}: {serving.exception()}")
        await asyncio.sleep(0.1)
    return server, serving, f"http://127.0.0.1:{port}"


async def serve_in_process(engine, registry, port: int):
    """The OpenAI-compatible API over this very engine (uvicorn on this event loop)."""
    server, serving, _ = await serve_app(create_api(engine, registry), port)
    return server, serving


class FirstTextClock:
    """Seconds from a start to the first text, per stream, with the wall-clock start."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        """(wall-clock start, seconds to the first text) per stream that gave text."""

    def ttft_p50(self, low: float, high: float) -> float | None:
        """The median of the streams started in [low, high] (wall clock)."""
        return percentile([t for start, t in self.samples if low <= start <= high], 50)


class LoopLag:
    """How late this process's event loop wakes a timer: while it writes a batch of chunks, a new
    request's head waits unread. Sampled every ``interval`` seconds while ``run`` runs."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        """(wall-clock time, seconds late) per wake-up."""

    async def run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.samples.append((time.time(), time.perf_counter() - t0 - self.interval))

    def figures(self, low: float, high: float) -> dict:
        """The lag's median and 99th percentile over [low, high] (wall clock)."""
        late = [lag for at, lag in self.samples if low <= at <= high]
        return {"loop_lag_p50": percentile(late, 50), "loop_lag_p99": percentile(late, 99)}


class EngineClock(FirstTextClock):
    """The engine as the API sees it, every stream timed from the API's call to its first text:
    the engine's share of an HTTP request's TTFT (the rest is HTTP, the API and the client)."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def stream(self, request):
        start, t0, timed = time.time(), time.perf_counter(), False
        async with contextlib.aclosing(self.engine.stream(request)) as chunks:
            async for chunk in chunks:  # closed with this stream, at once (a cut client)
                if chunk.text and not timed:
                    self.samples.append((start, time.perf_counter() - t0))
                    timed = True
                yield chunk


class ServerClock(FirstTextClock):
    """The API as its clients reach it (ASGI middleware): every streamed chat request timed from
    its arrival (uvicorn has parsed its head) to the write of its first text event — the API's
    share and the engine's; the rest of the client's TTFT is the connection and the client."""

    FIRST_TEXT = CHAT_TEXT_FIELD.encode()
    CHAT_ID = re.compile(rb'"id": ?"([^"]+)"')

    def __init__(self, app):
        super().__init__()
        self.app = app
        self.first_writes: dict[str, tuple[float, float]] = {}
        """Per chat id: (wall-clock arrival, wall-clock write of the first text)."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        start, t0, timed = time.time(), time.perf_counter(), False

        async def timed_send(message):
            nonlocal timed
            body = message.get("body", b"")
            if not timed and self.FIRST_TEXT in body:
                ttft = time.perf_counter() - t0
                self.samples.append((start, ttft))
                if found := self.CHAT_ID.search(body):
                    self.first_writes[found[1].decode()] = (start, start + ttft)
                timed = True
            await send(message)

        await self.app(scope, receive, timed_send)

    def hops(self, records: list[dict], low: float, high: float) -> dict:
        """Per request matched by its chat id, both ways between the client and this server: from
        the client's send to the server's arrival, and from the first text written to the
        client's first text (one wall clock: the same machine); medians over [low, high]."""
        there, back = [], []
        for r in records:
            seen = self.first_writes.get(r.get("id"))
            if seen and r["ttft"] is not None and low <= r["start"] <= high:
                there.append(seen[0] - r["start"])
                back.append(r["start"] + r["ttft"] - seen[1])
        return {"to_server_p50": percentile(there, 50), "to_client_p50": percentile(back, 50)}


async def http(engine, args, names: list[str], registry) -> dict:
    """The sweep's points again through the HTTP API, Locust in its own process, same engine."""
    server, serving = await serve_in_process(engine, registry, args.http_port)
    out = Path(args.out) / "http"
    cmd = [
        sys.executable, "-m", "loadtest.sweep", "--host", f"http://127.0.0.1:{args.http_port}",
        "--adapters", ",".join(map(str, args.http_adapters)),
        "--users", ",".join(map(str, args.http_users)), "--duration", str(round(args.duration)),
        "--warmup", str(args.warmup), "--prompt-words", "-".join(map(str, args.prompt_words)),
        "--output-tokens", "-".join(map(str, args.output_tokens)), "--out", str(out),
        "--server-pid", str(os.getpid()),
    ]  # fmt: skip
    meter = CpuMeter(os.getpid())  # this process (API + engine) and Locust, a finished child
    try:  # a thread, not asyncio's subprocess API: SGLang swaps in uvloop's policy, which has
        # no child watcher for the loop asyncio.run made before
        locust = await asyncio.to_thread(subprocess.run, cmd, cwd=Path(__file__).parents[1])
    finally:
        server.should_exit = True
        await serving
    busy = meter.cores()
    report = http_report(Path(args.out), out)
    report["cpu_cores_busy"] = {  # one Python thread serves the API: ~1.0 means it is the limit
        "engine_process": busy["server_cpu_cores"],
        "locust_clients": busy["client_cpu_cores"],
    }
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    (out / "compare.md").write_text(http_markdown(report))
    print(f"http: {json.dumps(report)}", flush=True)
    if locust.returncode:
        raise RuntimeError(f"the HTTP sweep failed (exit {locust.returncode}): {' '.join(cmd)}")
    return report


def occupancy(engine) -> dict:
    return {**engine.stats(), "gpu_memory_mib": gpu_memory_mib()}


async def settle(engine, seconds: float = 30) -> None:
    """Wait until the engine has no running or queued request (rows finish a step late)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        stats = engine.stats()
        if not stats.get("running") and not stats.get("queued"):
            return
        await asyncio.sleep(0.1)


async def soak(engine, args, names: list[str]) -> dict:
    await settle(engine)
    before = occupancy(engine)
    traffic = Traffic(names[: args.soak_adapters], args.prompt_words, args.output_tokens)
    deadline = time.perf_counter() + args.soak_seconds
    records: list[dict] = []
    hotloads: list[dict] = []

    async def client(i: int) -> None:
        rng = random.Random(7919 * i + 1)
        while time.perf_counter() < deadline:
            leave = rng.randint(1, 20) if rng.random() < args.disconnect else None
            request = traffic.request(rng)
            try:
                records.append(await asyncio.wait_for(timed_stream(engine, request, leave), 300))
            except TimeoutError:
                records.append({"ok": False, "cancelled": False, "output_tokens": 0,
                                "error": "lost: no end within 300 s"})  # fmt: skip

    async def hotloader() -> None:
        spare = Path(args.spare_adapter) if args.spare_adapter else None
        while spare and time.perf_counter() + args.hotload_every < deadline:
            await asyncio.sleep(args.hotload_every)
            name, t0 = f"hot-{len(hotloads)}", time.perf_counter()
            try:
                await engine.load_adapter(name, str(spare))
                probe = GenerationRequest(name, "Go on: a river", params=SamplingParams(16, 0.0))
                used = await timed_stream(engine, probe)
                await engine.unload_adapter(name)
                hotloads.append({"name": name, "ok": used["ok"], "s": time.perf_counter() - t0})
            except Exception as err:
                hotloads.append({"name": name, "ok": False, "error": str(err)})
            print(f"    soak: hot-load/unload {hotloads[-1]}", flush=True)

    tasks = [asyncio.create_task(client(i)) for i in range(args.soak_users)]
    tasks.append(asyncio.create_task(hotloader()))
    await asyncio.gather(*tasks)
    await settle(engine)
    after = occupancy(engine)
    cancelled = [r for r in records if r["cancelled"]]
    failed = [r for r in records if not r["ok"] and not r["cancelled"]]
    report = {
        "seconds": args.soak_seconds,
        "streams": args.soak_users,
        "adapters": args.soak_adapters,
        "requests": len(records),
        "completed": sum(r["ok"] for r in records),
        "cancelled_by_client": len(cancelled),
        "failed": len(failed),
        "errors": sorted({r["error"] for r in failed if r["error"]})[:10],
        "hotloads": hotloads,
        "before": before,
        "after": after,
        "throughput_tok_s": sum(r["output_tokens"] for r in records if r["ok"]) / args.soak_seconds,
    }
    (Path(args.out) / "soak.json").write_text(json.dumps(report, indent=1))
    (Path(args.out) / "soak.md").write_text(soak_markdown(report))
    print(f"soak: {json.dumps({k: v for k, v in report.items() if k != 'hotloads'})}")
    return report


def invocation() -> str:
    """This process's command line as one would type it again."""
    if Path(sys.argv[0]).resolve() == Path(__file__).resolve():
        return " ".join(["python -m loadtest.bench", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def product_loop_factory():
    """The event loop ``python -m engine.api`` serves on: uvicorn's "auto" (uvloop where it is
    installed, as on the GPU host), so both arms run on the product's loop."""
    return uvicorn.Config(app=None).get_loop_factory()


def settings_of(args, engine) -> dict:
    return {
        "command": invocation(),
        "event_loop": type(asyncio.get_running_loop()).__module__,
        "backend": engine.backend,
        "engine": engine.settings.model_dump(),
        "kv_pool_tokens": engine.stats().get("kv_pool_tokens"),  # SGLang's; None on CPU
        "start_notes": getattr(engine, "start_notes", None),  # SGLang's: what served in its place
        "duration": args.duration,
        "warmup": args.warmup,
    }


async def warm_up(engine, names: list[str]) -> None:
    """First requests compile kernels (Triton JIT on SGLang); keep that out of the numbers."""
    t0 = time.perf_counter()
    traffic = Traffic([None, *names[:16]], (20, 20), (16, 16))
    rng = random.Random(5)
    await asyncio.gather(*(timed_stream(engine, traffic.request(rng)) for _ in range(32)))
    await closed_loop(engine, Traffic(names[:64] or [None]), 64, 5)
    print(f"warm-up done in {time.perf_counter() - t0:.0f}s", flush=True)


async def wait_for_file(path: Path) -> None:
    t0 = time.perf_counter()
    while not path.exists():
        await asyncio.sleep(5)
    print(f"{path} appeared after {time.perf_counter() - t0:.0f}s of waiting", flush=True)


async def run(args) -> None:
    registry = load_registry(args.config)
    if args.backend == "hf":
        registry.engine.hf = with_overrides(registry.engine.hf, args.set)
    else:
        registry.engine.sglang = with_overrides(registry.engine.sglang, args.set)
    if args.sglang_counters:
        registry.engine.sglang = with_metrics(registry.engine.sglang)
    if args.dtype:
        registry.base.dtype = args.dtype
    if args.keep:
        registry.adapters = registry.adapters[: args.keep]
    t0 = time.perf_counter()
    engine = build_engine(registry, backend=args.backend)
    print(f"{engine.backend} engine up in {time.perf_counter() - t0:.0f}s", flush=True)
    names = [a.name for a in registry.adapters]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    GC_WATCH.install()
    tracing = None
    try:
        if args.sglang_counters:
            args.counter_trace = counter_trace(engine)
            tracing = asyncio.create_task(args.counter_trace.run())
        await warm_up(engine, names)
        if registry.server.freeze_heap:  # as python app.py does: this process is the server
            print(f"froze {freeze_heap()} objects out of the collector", flush=True)
        steps = {"sweep": sweep, "evict": evict, "soak": soak,
                 "http": functools.partial(http, registry=registry),
                 "pairs": functools.partial(pairs, registry=registry)}  # fmt: skip
        for step in args.plan.split(","):
            for path in args.wait_for if step != "soak" else []:
                await wait_for_file(Path(path))
            await steps[step](engine, args, names)
    finally:
        if tracing:
            tracing.cancel()
        await engine.shutdown()


def with_metrics(settings):
    """SGLang's settings with its own metrics on (``enable_metrics``): its scheduler then
    counts its passes for ``--sglang-counters``."""
    extra = json.dumps(settings.extra | {"enable_metrics": True})
    return with_overrides(settings, [f"extra={extra}"])


def counter_trace(engine) -> CounterTrace:
    """The trace of SGLang's pass counters; refused where the engine writes none."""
    path = multiprocess_dir()
    if engine.backend != "sglang" or not path:
        raise SystemExit(
            f"--sglang-counters: SGLang's counters need the sglang backend with its metrics "
            f"on; the engine is {engine.backend}, PROMETHEUS_MULTIPROC_DIR {path or 'unset'}"
        )
    return CounterTrace(path)


def main() -> None:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="adapters.yaml to serve")
    parser.add_argument("--backend", choices=["auto", "sglang", "hf"], default="auto")
    parser.add_argument("--dtype", help="override base.dtype")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="backend setting, e.g. max_loras_per_batch=128")  # fmt: skip
    parser.add_argument("--wait-for", metavar="FILE", action="append", default=[],
                        help="wait for FILE (repeatable) before each measurement: a soak may "
                             "overlap other GPU jobs, a measurement must not")  # fmt: skip
    parser.add_argument("--keep", type=int, help="serve only the first N registry adapters")
    parser.add_argument("--plan", default="sweep",
                        help="comma list of sweep, evict, soak, http, pairs")  # fmt: skip
    parser.add_argument("--adapters", type=ints, default=[1, 8, 32, 64, 128])
    parser.add_argument("--users", type=ints, default=[32, 128, 256])
    parser.add_argument("--duration", type=float, default=20, help="seconds per sweep point")
    parser.add_argument("--warmup", type=float, default=3,
                        help="seconds before the steady window starts")  # fmt: skip
    min_help = "run each point on until this many requests finished in its steady window"
    parser.add_argument("--min-completed", type=int, default=0, help=min_help)
    parser.add_argument("--prompt-words", type=parse_range, default=(90, 110))
    parser.add_argument("--output-tokens", type=parse_range, default=(90, 110))
    parser.add_argument("--http-users", type=ints, default=[256], help="http: concurrencies")
    parser.add_argument("--http-adapters", type=ints, default=[128], help="http: adapter counts")
    parser.add_argument("--http-port", type=int, default=8766)
    arrivals = parser.add_mutually_exclusive_group()
    arrivals.add_argument("--arrival-rate", type=float, default=0,
                        help="open loop: Poisson arrivals, this many a second, direct and "
                             "HTTP (0: closed, --users back to back)")  # fmt: skip
    arrivals.add_argument("--think-time", type=float, default=0,
                        help="closed loop: each client sleeps this long after an answer, "
                             "direct and HTTP (k6's sleep(1): users move in waves)")  # fmt: skip
    parser.add_argument("--locust-processes", type=int, default=1,
                        help="http, pairs: Locust's --processes per point")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=3, help="pairs: rounds per point")
    parser.add_argument("--pairs-strict", action="store_true",
                        help="pairs: stop where a point had failures or no result")  # fmt: skip
    parser.add_argument("--sync-users", type=int, help="pairs: start these rounds with a peer")
    parser.add_argument("--sync-mine", help="pairs: file touched when those rounds are due")
    parser.add_argument("--sync-theirs", help="pairs: file the peer touches when it is ready")
    parser.add_argument("--sync-timeout", type=float, default=300)
    parser.add_argument("--evict-rounds", type=int, default=5)
    parser.add_argument("--soak-seconds", type=float, default=600)
    parser.add_argument("--soak-users", type=int, default=256)
    parser.add_argument("--soak-adapters", type=int, default=64)
    parser.add_argument("--disconnect", type=float, default=0.05, help="share of clients leaving")
    parser.add_argument("--hotload-every", type=float, default=60)
    parser.add_argument("--spare-adapter", help="adapter dir hot-loaded during the soak")
    parser.add_argument("--sglang-counters", action="store_true",
                        help="SGLang: start it with enable_metrics and record each point's "
                             "prefill and decode passes (loadtest.sglang_counters)")  # fmt: skip
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.sglang_counters and args.backend == "hf":
        parser.error("--sglang-counters counts SGLang's passes: not with --backend hf")
    with asyncio.Runner(loop_factory=product_loop_factory()) as runner:
        runner.run(run(args))


if __name__ == "__main__":
    main()
