"""What the garbage collector costs the API's streams, with the start-up heap frozen or not.

    python -m loadtest.gc_pauses --users 256 --rounds 3 --duration 20 \
        --out results/serving/gc-pauses-frozen-heap

Our API (``engine.api``'s server, ``run_server``, as ``python app.py`` serves it) over
``NoModelEngine`` (``loadtest/no_model.py``: one token per open stream every ``--token-gap-ms``,
like a GPU's decode step), in a process that first imports what the CPU default's server holds
(torch, transformers, the app) — a full collection walks all of it. ``server.freeze_heap`` on
and off, alternating, ``--rounds`` times; Locust at ``--users`` streams (the same user as every
HTTP benchmark). Per point: collections and pause seconds per generation over the point (from
``/metrics``), the longest pause, TTFT p50/p90/p99 and output tok/s; per round, frozen ÷ not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx

from engine.paths import work_dir
from loadtest.procs import start_server
from loadtest.sweep import measure_point

ROOT = Path(__file__).resolve().parents[1]
MODES = {"frozen": True, "not frozen": False}


def serve(port: int, freeze: bool, gap_s: float) -> None:
    import torch  # noqa: F401  (the heap of the CPU default's server)
    import transformers  # noqa: F401

    import app  # noqa: F401
    from engine.api import create_api
    from engine.api.server import run_server
    from engine.registry import load_registry
    from loadtest.no_model import NoModelEngine

    registry = load_registry(ROOT / "adapters.yaml")
    registry.server.freeze_heap = freeze
    base = registry.base.name or Path(registry.base.model).name
    engine = NoModelEngine(base, [a.name for a in registry.adapters], gap_s)
    run_server(create_api(engine, registry), "127.0.0.1", port, log_level="warning")


def collector(url: str) -> dict[str, float]:
    """The ``loraland_gc_*`` lines of ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("loraland_gc_")
    }


def gen(name: str, generation: int) -> str:
    return f'{name}{{generation="{generation}"}}'


def one_point(args, mode: str, number: int) -> dict:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "loadtest.gc_pauses", "--serve", str(args.port), "--freeze",
           str(int(MODES[mode])), "--token-gap-ms", str(args.token_gap_ms)]  # fmt: skip
    url = f"http://127.0.0.1:{args.port}"
    server = start_server(cmd, f"{url}/v1/models", timeout_s=180, env=env)
    try:
        before = collector(url)
        point_args = SimpleNamespace(
            host=url, duration=args.duration, warmup=args.warmup, server_pid=server.pid,
            prompt_words="90-110", output_tokens=args.output_tokens,
        )  # fmt: skip
        raw = Path(args.out) / "raw" / f"{'frozen' if MODES[mode] else 'not-frozen'}-r{number}"
        raw.parent.mkdir(parents=True, exist_ok=True)
        point = measure_point(point_args, args.users, 1, raw.with_suffix(".jsonl"))
        after = collector(url)
    finally:
        server.terminate()
        server.wait(60)
    pauses = [after[k] for k in after if k.startswith("loraland_gc_pause_max_seconds")]

    def grew(name: str) -> float:
        return after.get(gen(name, 2), 0.0) - before.get(gen(name, 2), 0.0)

    return point | {
        "gen2_collections": grew("loraland_gc_collections_total"),
        "gen2_pause_s": grew("loraland_gc_pause_seconds_total"),
        "pause_max_s": max(pauses, default=0.0),
        "frozen_objects": after["loraland_gc_frozen_objects"],
    }


def run(args) -> dict:
    rounds = []
    for number in range(1, args.rounds + 1):
        order = list(MODES) if number % 2 else list(reversed(MODES))
        points = {}
        for mode in order:
            points[mode] = one_point(args, mode, number)
            p = points[mode]
            print(f"round {number}, {mode}: {p['output_throughput']:.0f} tok/s, TTFT p50 "
                  f"{p['ttft_p50'] * 1000:.0f} ms p90 {p['ttft_p90'] * 1000:.0f} ms, "
                  f"{p['gen2_collections']:.0f} full collections, {p['gen2_pause_s']:.3f} s "
                  f"paused in them", flush=True)  # fmt: skip
        rounds.append({"round": number, "order": order, "points": points})
        write(args, rounds)
    return {"rounds": rounds}


def write(args, rounds: list[dict]) -> None:
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("serve", "freeze")}
    (out / "results.json").write_text(json.dumps({"settings": settings, "rounds": rounds},
                                                 indent=1))  # fmt: skip
    (out / "results.md").write_text(markdown(args, rounds))
    if all(len(r["points"]) == len(MODES) for r in rounds):
        plot(rounds, out)


def plot(rounds: list[dict], out: Path) -> None:
    """Per round and mode: seconds in full collections, and TTFT p50 / p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (paused, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    numbers = [r["round"] for r in rounds]
    for offset, mode, color in ((-0.2, "frozen", "tab:blue"), (0.2, "not frozen", "tab:orange")):
        points = [r["points"][mode] for r in rounds]
        paused.bar([n + offset for n in numbers], [p["gen2_pause_s"] for p in points], 0.4,
                   label=mode, color=color)  # fmt: skip
        for key, style in (("ttft_p50", "o-"), ("ttft_p99", "s--")):
            ttft.plot(numbers, [p[key] * 1000 for p in points], style, color=color,
                      label=f"{mode}, {key[-3:]}")  # fmt: skip
    paused.set(xlabel="round", ylabel="seconds in full collections per point",
               title="The collector's full collections", xticks=numbers)  # fmt: skip
    ttft.set(xlabel="round", ylabel="TTFT (ms)", title="TTFT p50 and p99", xticks=numbers)
    for ax in (paused, ttft):
        ax.legend()
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out / "pauses.png", dpi=110)
    plt.close(fig)


def cell(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.{digits}f} [{low:.{digits}f}–{high:.{digits}f}]"


def markdown(args, rounds: list[dict]) -> str:
    lines = [
        "# The collector's pauses, start-up heap frozen or not",
        "",
        f"Command: `python -m loadtest.gc_pauses --users {args.users} --rounds {args.rounds} "
        f"--duration {args.duration} --warmup {args.warmup} --token-gap-ms {args.token_gap_ms} "
        f"--output-tokens {args.output_tokens} --out {args.out}`",
        "",
        f"{args.users} streams; median [range] over {len(rounds)} rounds, the order alternating.",
        "",
        "| mode | tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | full collections | "
        "paused in them, s | longest pause since start, ms | frozen objects |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        p = [r["points"][mode] for r in rounds if mode in r["points"]]
        lines.append(
            f"| {mode} | {cell([x['output_throughput'] for x in p])} | "
            f"{cell([x['ttft_p50'] for x in p], 1000, 1)} | "
            f"{cell([x['ttft_p90'] for x in p], 1000, 1)} | "
            f"{cell([x['ttft_p99'] for x in p], 1000, 1)} | "
            f"{cell([x['gen2_collections'] for x in p])} | "
            f"{cell([x['gen2_pause_s'] for x in p], 1, 3)} | "
            f"{cell([x['pause_max_s'] for x in p], 1000, 1)} | "
            f"{cell([x['frozen_objects'] for x in p])} |"
        )
    lines += ["", "| frozen ÷ not frozen (per round) | median [range] |", "|---|---|"]
    pairs = [r["points"] for r in rounds if len(r["points"]) == len(MODES)]
    for key, label in (("output_throughput", "tok/s"), ("ttft_p50", "TTFT p50"),
                       ("ttft_p90", "TTFT p90"), ("ttft_p99", "TTFT p99"),
                       ("gen2_pause_s", "time in full collections")):  # fmt: skip
        per = [p["frozen"][key] / p["not frozen"][key] for p in pairs if p["not frozen"][key]]
        lines.append(f"| {label} | {cell(per, 1, 2)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=20, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--token-gap-ms", type=float, default=20, help="a decode step")
    parser.add_argument("--output-tokens", default="90-110")
    parser.add_argument("--port", type=int, default=8793)
    parser.add_argument("--out", default=str(work_dir() / "gc-pauses"))
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--freeze", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", action="store_true", help="pauses.png from results.json")
    args = parser.parse_args()
    if args.plot_only:
        return plot(json.loads((Path(args.out) / "results.json").read_text())["rounds"],
                    Path(args.out))  # fmt: skip
    if args.serve:
        return serve(args.serve, bool(args.freeze), args.token_gap_ms / 1000)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run(args)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
