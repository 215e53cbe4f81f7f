"""What structured output costs: the address adapter's test prompts with and without its JSON
schema (``response_format`` json_schema, strict), at 1, 16 and 64 concurrent streams, through the
engine, in alternating pairs.

    python -m loadtest.structured --out results/structured/cpu-address          # CPU default
    python -m loadtest.structured --backend sglang --out /tmp/structured-h200     # one GPU

Per stream count and pair, one batch of greedy requests without the schema and one with it (the
order alternates between pairs, a warm-up batch of each first): each stream's decode tok/s
(``Timings.decode_tokens_per_s``, the headline: what a token costs with the grammar's mask),
the batch's total output tok/s, TTFT p50, and how many answers parse as JSON. The ratio
schema ÷ free is taken within each pair; the table gives its median and range. Writes
``results.json``, ``results.md`` and ``overhead.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from engine import build_engine, choose_backend
from engine.registry import load_registry, with_overrides
from finetune.data import load_split
from finetune.evaluate import requests_for
from finetune.tasks import TASKS
from loadtest.report import plt

MODES = ("free", "schema")


def pair_orders(pairs: int) -> list[tuple[str, str]]:
    """Free first in even pairs, schema first in odd ones."""
    return [MODES if i % 2 == 0 else MODES[::-1] for i in range(pairs)]


def batch_requests(spec, streams: int, constrain: bool, max_tokens: int | None) -> list:
    task = TASKS[spec.task]
    examples = load_split(spec.task, "test")
    chosen = [examples[i % len(examples)] for i in range(streams)]
    requests = requests_for(task, chosen, spec.name, spec, constrain)
    for request in requests:
        request.params.max_tokens = max_tokens or request.params.max_tokens
    return requests


def parses_as_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


async def measure_batch(engine, requests: list) -> dict:
    start = time.perf_counter()
    done = await engine.generate(requests)
    seconds = time.perf_counter() - start
    decode = [d.timings.decode_tokens_per_s for d in done if d.timings.decode_tokens_per_s]
    ttfts = [d.timings.ttft_s for d in done if d.timings.ttft_s is not None]
    tokens = sum(d.usage.completion_tokens for d in done)
    return {
        "stream_decode_tok_s": statistics.median(decode) if decode else None,
        "total_tok_s": tokens / seconds,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "completion_tokens": tokens,
        "json_answers": sum(parses_as_json(d.text) for d in done),
        "seconds": seconds,
    }


def ratio(pair: dict, key: str) -> float | None:
    free, schema = pair["free"][key], pair["schema"][key]
    return schema / free if free and schema else None


def spread(values: list[float | None]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def measure(engine, spec, streams: list[int], pairs: int, max_tokens, progress) -> list:
    points = []
    for n in streams:
        batches = {m: batch_requests(spec, n, m == "schema", max_tokens) for m in MODES}
        for mode in MODES:  # warm-up: the grammar compiled, the batch shapes seen
            await measure_batch(engine, batches[mode])
        runs = []
        for i, order in enumerate(pair_orders(pairs)):
            run = {mode: await measure_batch(engine, batches[mode]) for mode in order}
            runs.append(run)
            free, schema = (number(run[m]["stream_decode_tok_s"]) for m in MODES)
            progress(f"{n} streams, pair {i + 1}/{pairs}: {free} → {schema} tok/s a stream")
        points.append(
            {
                "streams": n,
                "pairs": runs,
                "decode_ratio": spread([ratio(r, "stream_decode_tok_s") for r in runs]),
                "total_ratio": spread([ratio(r, "total_tok_s") for r in runs]),
                "ttft_ratio": spread([ratio(r, "ttft_p50_s") for r in runs]),
            }
        )
    return points


def fmt(s: dict, digits: int = 2) -> str:
    if s["median"] is None:
        return "—"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def number(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def mode_median(point: dict, mode: str, key: str) -> float | None:
    """The median over the pairs; None where no pair measured it (every answer one token)."""
    values = [r[mode][key] for r in point["pairs"] if r[mode][key] is not None]
    return statistics.median(values) if values else None


def markdown(result: dict) -> str:
    lines = [
        f"### Structured-output overhead ({result['backend']}, {result['device']})",
        "",
        f"`{result['command']}`",
        "",
        f"Adapter `{result['adapter']}` on its test prompts, greedy, `max_tokens` "
        f"{result['max_tokens']}; schema = its strict JSON schema as `response_format`. Ratios "
        f"are schema ÷ free within each of {result['pairs']} alternating pairs: median (range).",
        "",
        "| streams | decode tok/s per stream, free → schema | per-stream decode ratio | "
        "total tok/s ratio | TTFT p50 ratio | JSON answers free / schema |",
        "|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        free = mode_median(p, "free", "stream_decode_tok_s")
        schema = mode_median(p, "schema", "stream_decode_tok_s")
        json_free = mode_median(p, "free", "json_answers")
        json_schema = mode_median(p, "schema", "json_answers")
        decode = f"{number(free)} → {number(schema)}"
        lines.append(
            f"| {p['streams']} | {decode} | **{fmt(p['decode_ratio'])}** | "
            f"{fmt(p['total_ratio'])} | {fmt(p['ttft_ratio'])} | "
            f"{json_free:.0f} / {json_schema:.0f} of {p['streams']} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in [("decode_ratio", "per-stream decode"), ("total_ratio", "total output")]:
        points = [p for p in result["points"] if p[key]["median"] is not None]
        x = [p["streams"] for p in points]
        mid = [p[key]["median"] for p in points]
        low = [m - p[key]["min"] for m, p in zip(mid, points)]
        high = [p[key]["max"] - m for m, p in zip(mid, points)]
        ax.errorbar(x, mid, yerr=[low, high], marker="o", capsize=4, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("tok/s with schema ÷ without")
    ax.set_title(f"Structured output on {result['backend']} ({result['adapter']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args, command: str) -> dict:
    registry = load_registry(args.config)
    specs = {a.name: a for a in registry.adapters}
    if args.adapter not in specs:
        raise SystemExit(f"--adapter {args.adapter}: not in {args.config}")
    if TASKS[specs[args.adapter].task].response_format() is None:
        raise SystemExit(f"--adapter {args.adapter}: its task has no answer format")
    backend = choose_backend(args.backend)
    if backend == "hf":  # every stream in one batch
        overrides = [f"max_batch_size={max(args.streams)}", *args.set]
        registry.engine.hf = with_overrides(registry.engine.hf, overrides)
    else:
        registry.engine.sglang = with_overrides(registry.engine.sglang, args.set)
    engine = build_engine(registry, backend=backend)

    async def everything() -> list:
        try:
            return await measure(
                engine, specs[args.adapter], args.streams, args.pairs, args.max_tokens, print
            )
        finally:
            await engine.shutdown()

    points = asyncio.run(everything())
    return {
        "command": command,
        "backend": engine.backend,
        "device": engine.device,
        "adapter": args.adapter,
        "max_tokens": args.max_tokens or TASKS[specs[args.adapter].task].max_tokens,
        "pairs": args.pairs,
        "points": points,
    }


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="adapters.yaml")
    parser.add_argument("--backend", default="hf", choices=["hf", "sglang", "auto"])
    parser.add_argument("--adapter", default="address", help="an adapter whose task has a format")
    parser.add_argument("--streams", default="1,16,64", type=int_list)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, help="default: the task's answer length")
    parser.add_argument("--set", action="append", default=[], help="engine setting KEY=JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    flags = " ".join(sys.argv[1:] if argv is None else argv)
    result = run(args, f"python -m loadtest.structured {flags}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(result))
    plot(result, args.out / "overhead.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
