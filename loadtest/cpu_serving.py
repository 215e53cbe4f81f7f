"""The CPU default against issue #20's targets, through the HTTP API, each CPU mode alternated in
one run: the fast default (batched LoRA, fp16 base weights), its exact mode (fp32) and peft.

    python -m loadtest.cpu_serving --out results/cpu/targets              # 3 rounds
    taskset -c 0,1 python -m loadtest.cpu_serving --out …   # 2 cores of a larger machine

Per mode and round, with the shipped adapters (one engine per mode and round, ``threads: 1``):
TTFT p50 of a ~100-token prompt, decode tok/s of one stream, total tok/s of 8 streams on one
adapter and on a mix (four adapters and the base), one stream's decode with a busy neighbour
process on the CPU, and the app's side-by-side example (the address adapter and the base on its
first example, as the UI's Run button does). Writes ``results.json``, ``results.md`` (medians
and ranges over the rounds, the targets beside them) and ``modes.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from engine import build_engine
from engine.api import create_api
from engine.paths import work_dir
from engine.registry import load_registry
from loadtest.bench import serve_app
from loadtest.report import plt

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "fast (batched, fp16)": {"lora": "batched", "base_weights": "fp16"},
    "exact (batched, fp32)": {"lora": "batched", "base_weights": "fp32"},
    "peft (fp32)": {"lora": "peft", "base_weights": "fp32"},
}
PROMPT = " ".join(["the river runs past the old mill and the town"] * 10)  # ~100 tokens
MIX = ["sentiment", "news", "spam", "sql", "base", "sentiment", "news", "spam"]
FIGURES = [
    "ttft_p50_s", "decode_tok_s", "eight_same_tok_s", "eight_mixed_tok_s", "mixed_over_same",
    "busy_decode_tok_s", "neighbour_slowdown", "side_by_side_s",
]  # fmt: skip
TARGETS = {
    "ttft_p50_s": ("≤", 0.4),
    "decode_tok_s": ("≥", 20),
    "eight_same_tok_s": ("≥", 60),
    "mixed_over_same": ("≥", 0.9),
    "neighbour_slowdown": ("≤", 2.0),
    "side_by_side_s": ("≤", 8.0),
}


def body(model: str, tokens: int, prompt: str = PROMPT) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "prompt_template": "raw",
        "stream": True,
    }


async def timed(client: httpx.AsyncClient, request: dict) -> list[float]:
    """Arrival times of a stream's content chunks, from the request's start."""
    t0, times = time.perf_counter(), []
    async with client.stream("POST", "/v1/chat/completions", json=request) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                times.append(time.perf_counter() - t0)
    return times


def decode_rate(times: list[float], tokens: int) -> float:
    return (tokens - 1) / (times[-1] - times[0])


async def streams(client, models: list[str], tokens: int) -> float:
    """Total output tok/s of one stream per model, all at once."""
    t0 = time.perf_counter()
    await asyncio.gather(*(timed(client, body(m, tokens)) for m in models))
    return len(models) * tokens / (time.perf_counter() - t0)


async def side_by_side(engine, registry) -> float:
    """The app's Run: the address adapter and the base on its first example, one batch."""
    from app import side_by_side as run_both
    from engine.sampling import resolve

    spec = registry.adapter("address")
    text = spec.render(spec.examples[0])
    t0 = time.perf_counter()
    async for _ in run_both(engine, "address", text, resolve(spec)):
        pass
    return time.perf_counter() - t0


async def one_round(mode: str, settings: dict, tokens: int) -> dict:
    registry = load_registry(ROOT / "adapters.yaml")
    for key, value in settings.items():
        setattr(registry.engine.hf, key, value)
    registry.engine.hf.threads = 1
    engine = build_engine(registry, backend="hf")
    server, serving, url = await serve_app(create_api(engine, registry))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=900) as client:
            await timed(client, body("base", 2))  # warm-up
            ttft = [(await timed(client, body("base", 1)))[0] for _ in range(5)]
            decode = decode_rate(await timed(client, body("sentiment", tokens)), tokens)
            same = await streams(client, ["sentiment"] * 8, tokens)
            mixed = await streams(client, MIX, tokens)
            with busy_neighbour():
                busy = decode_rate(await timed(client, body("sentiment", tokens)), tokens)
        both = await side_by_side(engine, registry)
    finally:
        server.should_exit = True
        await serving
        await engine.shutdown()
    row = {
        "mode": mode,
        "ttft_p50_s": statistics.median(ttft),
        "decode_tok_s": decode,
        "eight_same_tok_s": same,
        "eight_mixed_tok_s": mixed,
        "mixed_over_same": mixed / same,
        "busy_decode_tok_s": busy,
        "neighbour_slowdown": decode / busy,
        "side_by_side_s": both,
    }
    print(json.dumps(row), flush=True)
    return row


class busy_neighbour:
    """A process spinning on the CPU while the block runs (and no longer than its parent: a
    killed benchmark left one spinning for half an hour)."""

    def __enter__(self):
        spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
        self.process = subprocess.Popen([sys.executable, "-c", spin])
        time.sleep(0.5)

    def __exit__(self, *_):
        self.process.kill()
        self.process.wait()


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary(rows: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        out[mode] = {key: spread([r[key] for r in mine]) for key in mine[0] if key != "mode"}
    return out


def markdown(report: dict) -> str:
    lines = [
        f"### The CPU default against #20's targets ({report['rounds']} rounds, modes alternated)",
        "",
        f"`{report['command']}` — {report['cpu']}",
        "",
        "| figure | target | " + " | ".join(MODES) + " |",
        "|---|---|" + "---|" * len(MODES),
    ]
    for key in FIGURES:
        sign, goal = TARGETS.get(key, ("", None))
        cells = []
        for mode in MODES:
            s = report["summary"][mode][key]
            cells.append(f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})")
        target = f"{sign} {goal}" if goal is not None else ""
        lines.append(f"| {key} | {target} | " + " | ".join(cells) + " |")
    lines += ["", "Median (range) over the rounds; one engine per mode and round, 1 torch thread.",
              "", "![modes](modes.png)"]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> None:
    keys = ["decode_tok_s", "eight_same_tok_s", "eight_mixed_tok_s", "busy_decode_tok_s"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        values = [report["summary"][mode][k]["median"] for k in keys]
        ax.bar([k + i * width for k in range(len(keys))], values, width, label=mode)
    ax.set_xticks([k + width for k in range(len(keys))], keys, fontsize=8)
    ax.set_ylabel("tokens/s (median)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "modes.png", dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per stream")
    parser.add_argument("--out", type=Path, default=work_dir() / "cpu-targets")
    args = parser.parse_args()
    rows = []
    for round_ in range(args.rounds):
        for mode, settings in MODES.items():
            print(f"round {round_ + 1}/{args.rounds}: {mode}", flush=True)
            rows.append(asyncio.run(one_round(mode, settings, args.tokens)))
    report = {
        "command": "python -m loadtest.cpu_serving " + " ".join(sys.argv[1:]),
        "cpu": f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores usable",
        "rounds": args.rounds,
        "rows": rows,
        "summary": summary(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out)
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
