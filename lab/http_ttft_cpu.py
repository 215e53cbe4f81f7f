"""The HTTP arm's TTFT split again on this CPU, with no model: where do the ~15 ms between the
Locust client and our server go (issue #16 item 1; on the H200 the server's TTFT is 7 ms above the
engine's and the client's 15 ms above the server's, results/serving/h200-7b-http-server-share)?

    python lab/http_ttft_cpu.py --users 1,64,256 --gap-ms 25 --pairs 3 --duration 12 \
        --warmup 4 --out results/serving/http-ttft-hops-cpu

``loadtest.bench``'s pairs plan, unchanged, over ``NoModelEngine`` (every open stream one token
per ``--gap-ms`` step, like a GPU batch step at 256 streams) for the adapters of adapters.yaml:
engine-direct and through the API with Locust, the engine's, the server's and the client's TTFT,
the event loop's lag. No GPU, no model: the split's shape, not the H200's figures.

    python lab/http_ttft_cpu.py --arrivals --users 256 --gap-ms 25 --pairs 3 --duration 12 \
        --warmup 4 --out results/serving/http-ttft-hops-cpu/arrivals

``--arrivals``: through the API only, closed loop (each user's next request the moment its
last stream ends) against open loop (Poisson arrivals at the rate the closed point carried,
``--arrival-rate`` of the Locust user), closed first in every round (the open point takes its
rate): does a request wait at the server's door because a closed-loop client sends it in the
middle of a step's burst of writes?

    python lab/http_ttft_cpu.py --parsers h11,httptools --users 256 --gap-ms 25 --pairs 3 \
        --duration 12 --warmup 4 --out results/serving/http-ttft-hops-cpu/parsers

``--parsers``: closed loop through the API only, a fresh uvicorn per point with each HTTP
implementation in turn (the product runs uvicorn's "auto": httptools when installed, else h11).

    python lab/http_ttft_cpu.py --loops asyncio,uvloop --users 256 --gap-ms 25 --pairs 3 \
        --duration 12 --warmup 4 --out results/serving/http-ttft-hops-cpu/loops

``--loops``: the same, each point on a fresh event loop of its kind (uvicorn's "auto" loop is
uvloop when installed).

    python lab/http_ttft_cpu.py --waves --users 256 --gap-ms 25 --pairs 3 --duration 30 \
        --warmup 8 --out results/serving/http-ttft-hops-cpu/waves

``--waves``: through the API only, closed loop against k6's profile (each user sleeps 1 s after
an answer, Locust's ``--think-time``), as ``loadtest.bursty``'s first two arms on the H200 — but
the stand-in engine's first token costs one step however many prompts arrive together, so what
a wave adds to TTFT here is the API's share of it (admitting a wave of requests on one loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.metrics import GC_WATCH  # noqa: E402
from engine.registry import load_registry  # noqa: E402
from loadtest import bench, bursty  # noqa: E402
from loadtest.no_model import NoModelEngine  # noqa: E402
from loadtest.stats import parse_range  # noqa: E402


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "adapters.yaml"))
    parser.add_argument("--users", default="256", help="comma list of concurrencies")
    parser.add_argument("--gap-ms", type=float, default=25, help="the stand-in engine's step")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--output-tokens", type=parse_range, default=(90, 110))
    parser.add_argument("--http-port", type=int, default=8797)
    parser.add_argument("--locust-processes", type=int, default=1)
    parser.add_argument("--arrival-rate", type=float, default=0, help="pairs: open loop, /s")
    parser.add_argument("--arrivals", action="store_true", help="closed vs open loop, HTTP only")
    parser.add_argument("--parsers", type=lambda text: text.split(","), default=None,
                        help="uvicorn's HTTP implementations, e.g. h11,httptools")  # fmt: skip
    parser.add_argument("--loops", type=lambda text: text.split(","), default=None,
                        help="event loops, e.g. asyncio,uvloop")  # fmt: skip
    parser.add_argument("--waves", action="store_true", help="closed vs 1-s think time, HTTP")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.users = [int(u) for u in args.users.split(",")]
    args.prompt_words, args.min_completed = (90, 110), 0
    args.pairs_strict, args.sync_users = True, None
    return args


FIGURES = {  # figure: (label, scale)
    "request_throughput": ("requests/s", 1),
    "output_throughput": ("output tok/s", 1),
    "ttft_p50": ("client's TTFT p50 ms", 1000),
    "server_ttft_p50": ("server's TTFT p50 ms", 1000),
    "to_server_p50": ("client's send to the server's arrival, p50 ms", 1000),
    "to_client_p50": ("first text written to read, p50 ms", 1000),
    "loop_lag_p50": ("server's loop lag p50 ms", 1000),
    "loop_lag_p99": ("server's loop lag p99 ms", 1000),
    "ttft_p50_quietest_quarter": ("client's TTFT p50, quietest ¼ of arrivals, ms", 1000),
    "ttft_p50_busiest_quarter": ("client's TTFT p50, busiest ¼ of arrivals, ms", 1000),
    "arrivals_per_100ms_p99": ("arrivals per 100 ms, p99", 1),
    "client_loop_lag_p50": ("Locust's hub lag p50 ms", 1000),
    "client_loop_lag_p99": ("Locust's hub lag p99 ms", 1000),
    "server_cpu_cores": ("serving process cores", 1),
    "client_cpu_cores": ("Locust cores", 1),
}


def summary_line(point: dict) -> str:
    return ", ".join(
        f"{label} {point[k] * scale:.1f}" for k, (label, scale) in FIGURES.items() if point.get(k)
    )


def arms_markdown(results: dict, arms) -> str:
    """Each figure's median [range] over the rounds, an arm a column."""
    lines = [
        f"`{results['settings']['command']}`\n",
        "| figure | " + " | ".join(f"{arm}: median [range]" for arm in arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for key, (label, scale) in FIGURES.items():
        if all(r["points"][arm].get(key) is None for r in results["rounds"] for arm in arms):
            continue  # a figure this mode does not measure
        cells = []
        for arm in arms:
            values = [r["points"][arm].get(key) for r in results["rounds"]]
            values = sorted(v * scale for v in values if v is not None)
            if not values:
                cells.append("—")
                continue
            mid = statistics.median(values)
            digits = 2 if "cores" in label else 1
            cells.append(f"{mid:.{digits}f} [{values[0]:.{digits}f}–{values[-1]:.{digits}f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{len(results['rounds'])} rounds.\n"


async def http_only_point(
    engine, args, registry, raw: Path, parser: str = "auto", arrival_rate: float = 0,
    think_time: float = 0,
) -> dict:  # fmt: skip
    """One Locust point through a fresh uvicorn (``parser``: its HTTP implementation) over
    ``engine``, on the running event loop, with its lag; closed loop, open at ``arrival_rate``
    or with ``think_time`` after each answer."""
    clock = bench.ServerClock(bench.create_api(engine, registry))
    server, serving, _ = await bench.serve_app(clock, args.http_port, http=parser)
    lag = bench.LoopLag()
    lagging = asyncio.create_task(lag.run())
    try:
        options = bench.locust_options(args, args.http_port)
        options.arrival_rate, options.think_time = arrival_rate, think_time
        clocks = {"server_ttft_p50": clock}
        users, adapters = args.users[0], args.adapters[0]
        return await bench.http_point(options, users, adapters, raw, clocks, lag)
    finally:
        lagging.cancel()
        server.should_exit = True
        await serving


def compare(arms: list[str], point, args, turn: bool = True) -> dict:
    """Rounds of one point per arm, the order turned each round (``turn``): ``point(arm, raw)``
    measures one. Writes results.json and summary.md into ``--out``."""
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    results = {"settings": vars(args) | {"command": " ".join(["python", *sys.argv])}, "rounds": []}
    for number in range(1, args.pairs + 1):
        points = {}
        for arm in arms if number % 2 or not turn else arms[::-1]:
            points[arm] = point(arm, out / "raw" / f"{arm}-r{number}.jsonl")
            print(f"round {number}, {arm}: {summary_line(points[arm])}", flush=True)
        results["rounds"].append({"round": number, "points": points})
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(arms_markdown(results, arms))
    print((out / "summary.md").read_text())
    return results


def loop_factory(name: str):
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise SystemExit(f"--loops: asyncio or uvloop, not {name}")


def engine_of(args) -> tuple[NoModelEngine, object]:
    registry = load_registry(args.config)
    names = [a.name for a in registry.adapters]
    args.adapters = [len(names)]
    return NoModelEngine(registry.base.name or "base", names, args.gap_ms / 1000), registry


def parsers(args) -> dict:
    """``--parsers``: uvicorn's HTTP implementations, one fresh server each, on one loop."""
    engine, registry = engine_of(args)
    with asyncio.Runner() as runner:
        return compare(args.parsers, lambda arm, raw: runner.run(
            http_only_point(engine, args, registry, raw, arm)), args)  # fmt: skip


def loops(args) -> dict:
    """``--loops``: each point on a fresh event loop of its kind (asyncio's own or uvloop's),
    uvicorn's "auto" HTTP implementation, the same model-free engine."""
    engine, registry = engine_of(args)

    def point(arm: str, raw: Path) -> dict:
        engine.step = None  # a pending step of the last loop belongs to that loop
        with asyncio.Runner(loop_factory=loop_factory(arm)) as runner:
            return runner.run(http_only_point(engine, args, registry, raw))

    return compare(args.loops, point, args)


def arrivals(args) -> dict:
    """``--arrivals``: closed loop, then open loop at the request rate the closed point carried
    (Poisson), each round in that order."""
    engine, registry = engine_of(args)
    closed_rate = 0.0

    def point(arm: str, raw: Path) -> dict:
        nonlocal closed_rate
        rate = closed_rate if arm == "open" else 0
        measured = runner.run(http_only_point(engine, args, registry, raw, arrival_rate=rate))
        closed_rate = measured["request_throughput"] if arm == "closed" else closed_rate
        return measured

    with asyncio.Runner() as runner:
        return compare(["closed", "open"], point, args, turn=False)


def waves(args) -> dict:
    """``--waves``: closed loop against a 1-s think time (k6's profile), with how arrivals bunch
    and the TTFT of the busiest and quietest quarter, as ``loadtest.bursty`` reports them."""
    engine, registry = engine_of(args)

    def point(arm: str, raw: Path) -> dict:
        think = 1.0 if arm == "think" else 0.0
        measured = runner.run(http_only_point(engine, args, registry, raw, think_time=think))
        records = bursty.read_records(raw)
        began = min(r["start"] for r in records)
        window = (began + args.warmup, began + args.duration)
        return measured | bursty.arrival_profile(records, window)

    with asyncio.Runner() as runner:
        return compare(["closed", "think"], point, args)


def pairs(args) -> dict:
    """The pairs plan of ``loadtest.bench`` over the model-free engine."""
    engine, registry = engine_of(args)
    names = [a.name for a in registry.adapters]
    return asyncio.run(bench.pairs(engine, args, names, registry))


def main(argv: list[str] | None = None) -> dict:
    args = options(argv)
    GC_WATCH.install()
    if args.arrivals:
        return arrivals(args)
    if args.parsers:
        return parsers(args)
    if args.loops:
        return loops(args)
    if args.waves:
        return waves(args)
    return pairs(args)


if __name__ == "__main__":
    main()
