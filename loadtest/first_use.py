"""What loading an adapter on its first request costs: TTFT of a cold adapter (loaded by that
request, ``engine.load_on_demand``) against the same adapter warm, through the HTTP API.

    python -m loadtest.first_use --config adapters.yaml --out results/combine/first-use-cpu
    python -m loadtest.first_use --config /tmp/synth7b/adapters.yaml --adapters 8 \\
        --out /tmp/first-use-h200                      # a 7B-shape adapter on SGLang

The registry's adapters are copied under a fresh adapter root and served with none of them
loaded; each is asked once (cold: the load is in its TTFT) and again (warm), in turn, with the
base model asked between as the control. Writes ``first_use.json`` and ``first_use.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path

import httpx

from engine import build_engine
from engine.api import create_api
from engine.paths import work_dir
from engine.registry import load_registry
from loadtest.bench import serve_app


async def ttft(client: httpx.AsyncClient, model: str) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello there."}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "prompt_template": "raw",
    }
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                return time.perf_counter() - t0
    raise RuntimeError(f"{model}: no token streamed")


async def measure(args) -> dict:
    registry = load_registry(args.config)
    chosen = registry.adapters[: args.adapters]
    root = work_dir() / "first-use-root"
    shutil.rmtree(root, ignore_errors=True)
    for spec in chosen:
        shutil.copytree(spec.path, root / spec.name)
    registry.adapters = []
    registry.engine.load_on_demand = True
    engine = build_engine(registry, backend=args.backend)
    server, serving, url = await serve_app(create_api(engine, registry, adapter_root=root))
    rows = []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            await ttft(client, "base")  # warm the engine itself
            for spec in chosen:
                base = await ttft(client, "base")
                cold = await ttft(client, spec.name)
                warm = await ttft(client, spec.name)
                rows.append({"adapter": spec.name, "base_s": base, "cold_s": cold, "warm_s": warm})
                print(f"{spec.name}: cold {cold * 1000:.0f} ms, warm {warm * 1000:.0f} ms, "
                      f"base {base * 1000:.0f} ms", flush=True)  # fmt: skip
    finally:
        server.should_exit = True
        await serving
        await engine.shutdown()
    added = [r["cold_s"] - r["warm_s"] for r in rows]
    return {
        "command": "python -m loadtest.first_use " + " ".join(args.argv),
        "backend": engine.backend,
        "device": engine.device,
        "rows": rows,
        "added_ms_median": round(statistics.median(added) * 1000, 1),
        "added_ms_range": [round(min(added) * 1000, 1), round(max(added) * 1000, 1)],
    }


def markdown(report: dict) -> str:
    lines = [
        f"### First use of an adapter ({report['backend']}, {report['device']})",
        "",
        f"`{report['command']}`",
        "",
        "| adapter | TTFT cold (loads it) ms | TTFT warm ms | base ms | added by the load ms |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['adapter']} | {r['cold_s'] * 1000:.0f} | {r['warm_s'] * 1000:.0f} | "
            f"{r['base_s'] * 1000:.0f} | {(r['cold_s'] - r['warm_s']) * 1000:+.0f} |"
        )
    low, high = report["added_ms_range"]
    median, n = report["added_ms_median"], len(report["rows"])
    lines += [
        "",
        f"Added by loading on first use: median **{median:+.0f} ms** "
        f"(range {low:+.0f} to {high:+.0f} ms over {n} adapters).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="adapters.yaml")
    parser.add_argument("--backend", choices=["auto", "hf", "sglang"], default="auto")
    parser.add_argument("--adapters", type=int, default=5, help="how many registry adapters")
    parser.add_argument("--out", type=Path, default=work_dir() / "first-use")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    report = asyncio.run(measure(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "first_use.json").write_text(json.dumps(report, indent=1))
    (args.out / "first_use.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
