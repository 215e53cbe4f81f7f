"""Bursty arrivals (issue #16): closed loop against the LoRA Land k6 profile (1 s think time)
and against Poisson arrivals at the same request rate, on one server, in alternating rounds.

    python -m loadtest.bursty --config /tmp/synth7b/adapters.yaml --out /tmp/bursty \
        --set max_loras_per_batch=128 --set mem_fraction_static=0.7
    python -m loadtest.bursty --config adapters.yaml --users 8 --adapters 4 --duration 10 \
        --pairs 1 --out /tmp/bursty-cpu                                        # CPU-sized

Starts ``python -m engine.api`` once with the shipped defaults (plus ``--set``), then each round
runs three Locust points at ``--users`` × ``--adapters``: ``closed`` (back to back), ``think``
(each user waits ``--think-time`` after an answer, as k6's ``sleep(1)``) and ``poisson`` (open
loop at the rate requests arrived in the ``think`` point's measured window, so the two differ
only in how arrivals bunch). Per point, beside Locust's figures: requests in flight, how
arrivals bunch (the coefficient of variation of arrivals per 100 ms; Poisson gives about
1 / sqrt(mean)), and TTFT p50 of the quarter of requests that arrived in the busiest 250 ms
against the quietest quarter. Writes ``results.json``, ``bursty.md``, ``rounds.png`` (per
round, from results.json) and ``bursty.png`` (the last round's measured window, from the raw
records) into ``--out``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
from pathlib import Path

from loadtest.pairs import fmt, median_range
from loadtest.procs import absolute_registry, start_server, write_registry
from loadtest.report import describe, plt
from loadtest.stats import percentile
from loadtest.sweep import measure_point

ARMS = ("closed", "think", "poisson")
BIN_S = 0.1
BURST_S = 0.25


def arrivals_per_bin(starts: list[float], low: float, high: float) -> list[int]:
    counts = [0] * max(1, int((high - low) / BIN_S))
    for start in starts:
        if low <= start < high:
            counts[min(len(counts) - 1, int((start - low) / BIN_S))] += 1
    return counts


def burst_of(start: float, starts: list[float]) -> int:
    """Requests (this one too) that arrived in the BURST_S before this one; ``starts`` sorted."""
    return bisect.bisect_right(starts, start) - bisect.bisect_right(starts, start - BURST_S)


def in_flight(records: list[dict], low: float, high: float) -> float:
    """Mean requests open over the window: each request's time inside it, over its length."""
    busy = sum(max(0.0, min(high, r["start"] + r["e2e"]) - max(low, r["start"])) for r in records)
    return busy / (high - low)


def arrival_profile(records: list[dict], window: tuple[float, float]) -> dict:
    """How arrivals bunch in the steady window, and what TTFT does in the bunches."""
    low, high = window
    inside = [r for r in records if low <= r["start"] <= high and r.get("e2e") is not None]
    starts = sorted(r["start"] for r in records)
    bins = arrivals_per_bin(starts, low, high)
    mean = statistics.fmean(bins)
    answered = sorted(
        (burst_of(r["start"], starts), r["ttft"]) for r in inside if r.get("ttft") is not None
    )
    quarter = max(1, len(answered) // 4)
    return {
        "arrivals_per_100ms": mean,
        "arrival_cv": statistics.pstdev(bins) / mean if mean else None,
        "arrivals_per_100ms_p99": percentile(bins, 99),
        "in_flight": in_flight(inside, low, high),
        "ttft_p50_busiest_quarter": percentile([t for _, t in answered[-quarter:]], 50),
        "ttft_p50_quietest_quarter": percentile([t for _, t in answered[:quarter]], 50),
    }


def read_records(raw: Path) -> list[dict]:
    return [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]


def point_options(args, arm: str, rate: float) -> argparse.Namespace:
    return argparse.Namespace(
        host=args.host, duration=args.duration, warmup=args.warmup,
        prompt_words=args.prompt_words, output_tokens=args.output_tokens, server_pid=args.pid,
        think_time=args.think_time if arm == "think" else 0.0,
        arrival_rate=rate if arm == "poisson" else 0.0,
    )  # fmt: skip


def run_arm(args, arm: str, number: int, rate: float) -> dict:
    raw = Path(args.out) / "raw" / f"{arm}-r{number}.jsonl"
    point = measure_point(point_options(args, arm, rate), args.users, args.adapters, raw)
    records = read_records(raw)
    began = min(r["start"] for r in records)
    point |= arrival_profile(records, (began + args.warmup, began + args.duration))
    point["arrival_rate_asked"] = rate if arm == "poisson" else None
    return point


def run_round(args, number: int) -> dict:
    """closed → think → poisson, or think → poisson → closed: poisson always follows think."""
    order = ARMS if number % 2 else ARMS[1:] + ARMS[:1]
    points: dict[str, dict] = {}
    for arm in order:
        rate = 10 * ((points.get("think") or {}).get("arrivals_per_100ms") or 0.0)
        print(f"[bursty] round {number}: {arm}", flush=True)
        if arm == "poisson" and not rate:  # rate 0 would make the open-loop user a closed one
            points[arm] = {"skipped": "no request arrived in the think point's steady window"}
            continue
        points[arm] = run_arm(args, arm, number, rate)
        print(f"    {describe(points[arm])}", flush=True)
    return {"round": number, "points": points}


FIGURES = ("output_throughput", "request_throughput", "ttft_p50", "ttft_p90", "in_flight",
           "arrival_cv", "ttft_p50_busiest_quarter", "ttft_p50_quietest_quarter")  # fmt: skip


def served(point: dict) -> float | None:
    """Requests completed ÷ requests arrived per second: well below 1, arrivals outran the
    server and the point never reached a steady state (``stats.summarize``'s ``served``; points
    measured before it existed: from the arrivals per 100 ms)."""
    if "served" in point:
        return point["served"]
    arrived = 10 * (point.get("arrivals_per_100ms") or 0.0)
    return (
        point["request_throughput"] / arrived if arrived and "request_throughput" in point else None
    )


def summarize(rounds: list[dict]) -> dict:
    summary = {}
    for arm in ARMS:
        for figure in FIGURES:
            summary[f"{arm}:{figure}"] = median_range(
                [r["points"][arm].get(figure) for r in rounds]
            )
        summary[f"{arm}:served"] = median_range([served(r["points"][arm]) for r in rounds])
    for high, low in (("think", "closed"), ("poisson", "closed"), ("think", "poisson")):
        for figure in ("output_throughput", "ttft_p50"):
            pairs = [(r["points"][high].get(figure), r["points"][low].get(figure)) for r in rounds]
            summary[f"{high}/{low}:{figure}"] = median_range([a / b for a, b in pairs if a and b])
    return summary


def markdown(results: dict) -> str:
    s, settings = results["summary"], results["settings"]
    lines = [
        "# Bursty arrivals: closed loop, k6's think time, Poisson at the same rate", "",
        f"Command: `{settings['command']}`", "",
        f"{settings['users']} users over {settings['adapters']} adapters, think time "
        f"{settings['think_time']} s, {settings['duration']}-s points ({settings['warmup']} s "
        f"warm-up), {len(results['rounds'])} of {settings['pairs']} rounds; median [min–max] "
        "over the rounds.", "",
        "| arm | output tok/s | req/s | TTFT p50 (ms) | TTFT p90 (ms) | in flight | arrival CV "
        "(per 100 ms) | TTFT p50 busiest ¼ (ms) | TTFT p50 quietest ¼ (ms) | completed ÷ arrived |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    scales = {"ttft_p50": 1000, "ttft_p90": 1000, "ttft_p50_busiest_quarter": 1000,
              "ttft_p50_quietest_quarter": 1000}  # fmt: skip
    for arm in ARMS:
        cells = []
        for figure in FIGURES:
            digits = {"arrival_cv": 2, "in_flight": 1, "request_throughput": 1}.get(figure, 0)
            median, spread = fmt(s[f"{arm}:{figure}"], scales.get(figure, 1), digits)
            cells.append(f"{median} [{spread}]")
        median, spread = fmt(s.get(f"{arm}:served"), 1, 2)
        cells.append(f"{median} [{spread}]")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Completed ÷ arrived well below 1: arrivals outran the server and the arm never "
              "reached a steady state; its TTFT is not comparable with the others'."]  # fmt: skip
    lines += ["", "| ratio (per round) | tok/s | TTFT p50 |", "|---|---|---|"]
    for pair in ("think/closed", "poisson/closed", "think/poisson"):
        tok, ttft = fmt(s[f"{pair}:output_throughput"]), fmt(s[f"{pair}:ttft_p50"])
        lines.append(
            f"| {pair.replace('/', ' ÷ ')} | {tok[0]} [{tok[1]}] | {ttft[0]} [{ttft[1]}] |"
        )
    return "\n".join(lines) + "\n"


def steady_records(records: list[dict], settings: dict) -> tuple[list[dict], float]:
    """The requests that started in the measured window (after the warm-up), and its start."""
    began = min(r["start"] for r in records) + settings["warmup"]
    ended = began - settings["warmup"] + settings["duration"]
    return [r for r in records if began <= r["start"] <= ended], began


def octiles(records: list[dict], starts: list[float]) -> list[list[tuple[int, float]]]:
    """(bunching, TTFT) of every answered request, sorted by bunching, in eight slices."""
    pairs = sorted((burst_of(r["start"], starts), r["ttft"]) for r in records if r.get("ttft"))
    size = max(1, len(pairs) // 8)
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


def plot_rounds(results: dict, out: Path) -> None:
    """From results.json alone: TTFT p50 and arrival CV per arm, each round."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    rounds = [r["round"] for r in results["rounds"]]
    for k, arm in enumerate(ARMS):
        points = [r["points"][arm] for r in results["rounds"]]
        places = [i + (k - 1) * 0.27 for i in range(len(rounds))]
        axes[0].bar(places, [1000 * (p.get("ttft_p50") or 0) for p in points], 0.27, label=arm)
        axes[1].bar(places, [p.get("arrival_cv") or 0 for p in points], 0.27, label=arm)
    for ax, label in zip(axes, ("TTFT p50 (ms)", "arrival CV (per 100 ms)"), strict=True):
        ax.set_xticks(range(len(rounds)), [f"round {r}" for r in rounds])
        ax.set(ylabel=label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=110)
    plt.close(fig)


def plot(results: dict, out: Path) -> None:
    """The last round's measured window: arrivals per 100 ms over its first 10 s, and TTFT
    against how many requests arrived just before (the start-up wave left out)."""
    number = results["rounds"][-1]["round"]
    raws = {arm: out / "raw" / f"{arm}-r{number}.jsonl" for arm in ("think", "poisson", "closed")}
    raws = {arm: raw for arm, raw in raws.items() if raw.exists()}
    if not raws:  # raw records not kept: nothing to draw
        return
    fig, (timeline, by_burst) = plt.subplots(1, 2, figsize=(12, 4.2))
    for arm, raw in raws.items():
        records = read_records(raw)
        inside, began = steady_records(records, results["settings"])
        starts = sorted(r["start"] for r in records)
        bins = arrivals_per_bin(starts, began, began + 10)
        timeline.plot([i * BIN_S for i in range(len(bins))], bins, label=arm, lw=1)
        chunks = octiles(inside, starts)
        by_burst.plot([statistics.fmean(b for b, _ in c) for c in chunks],
                      [1000 * statistics.median(t for _, t in c) for c in chunks], "o-",
                      label=arm)  # fmt: skip
    timeline.set(xlabel="seconds into the measured window", ylabel="requests arriving per 100 ms",
                 title=f"Arrivals, round {number} (first 10 s after the warm-up)")  # fmt: skip
    by_burst.set(xlabel=f"requests arrived in the {BURST_S * 1000:.0f} ms before (octiles)",
                 ylabel="TTFT p50 (ms)", title="TTFT against bunching")  # fmt: skip
    for ax in (timeline, by_burst):
        ax.legend()
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out / "bursty.png", dpi=110)
    plt.close(fig)


def write(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "bursty.md").write_text(markdown(results))


def run(args) -> dict:
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    config = write_registry(absolute_registry(Path(args.config), args.set), out / "served.yaml")
    results = {"settings": dict(vars(args)), "rounds": []}
    results["settings"]["command"] = "python -m loadtest.bursty " + " ".join(sys.argv[1:])
    cmd = [sys.executable, "-m", "engine.api", "--config", str(config), "--port", str(args.port)]
    server = start_server(cmd, f"http://127.0.0.1:{args.port}/health", timeout_s=1200)
    args.host, args.pid = f"http://127.0.0.1:{args.port}", server.pid
    try:
        warm = point_options(args, "closed", 0.0)
        warm.duration, warm.warmup = 10, 0
        measure_point(warm, args.users, args.adapters, out / "raw" / "warm-up.jsonl")
        for number in range(1, args.pairs + 1):
            results["rounds"].append(run_round(args, number))
            results["summary"] = summarize(results["rounds"])
            write(out, results)
        plot_rounds(results, out)
        plot(results, out)
    finally:
        server.terminate()
        server.wait(timeout=120)
    print((out / "bursty.md").read_text(), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="the registry to serve")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="an engine.sglang setting")  # fmt: skip
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=128)
    parser.add_argument("--think-time", type=float, default=1.0)
    parser.add_argument("--pairs", type=int, default=3, help="rounds of the three arms")
    parser.add_argument("--duration", type=int, default=30, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=8)
    parser.add_argument("--prompt-words", default="90-110")
    parser.add_argument("--output-tokens", default="90-110")
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot-only", action="store_true",
                        help="from results.json: bursty.md again, rounds.png, and bursty.png "
                             "where raw/ is kept")  # fmt: skip
    args = parser.parse_args()
    if not args.plot_only and not args.config:
        parser.error("--config is required")
    if args.plot_only:
        results = json.loads((Path(args.out) / "results.json").read_text())
        results["summary"] = summarize(results["rounds"])
        write(Path(args.out), results)
        plot_rounds(results, Path(args.out))
        plot(results, Path(args.out))
        return
    run(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
