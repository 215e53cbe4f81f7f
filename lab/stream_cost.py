"""What our SGLang backend's stream path costs the serving process per output, on the CPU, with
a stand-in for ``sglang.Engine`` (no GPU): 256 streams of 100 one-token outputs each, the CPU
time of the process per output. Compares source trees (this one and an exported older commit)
in alternating rounds:

    git archive e930aef engine pyproject.toml | (mkdir -p /tmp/old && tar x -C /tmp/old)
    python lab/stream_cost.py compare --tree e930aef=/tmp/old --tree now=. --rounds 5 \
        --out results/serving/stream-path-cpu-cost

``measure`` (run inside a tree, as ``compare`` does) prints one JSON line. The stand-in yields
outputs as SGLang's incremental streaming does (new ids, meta_info, the finish reason last), so
what is timed is our code between SGLang's output and the caller's chunk: ``DeltaTracker`` with
the SmolLM2 tokenizer, the abort checks, the request clock, the generator layers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

STREAMS, TOKENS = 256, 100


class StandInSGLang:
    """``sglang.Engine``'s surface the stream path drives: streams of one-token outputs."""

    def __init__(self):
        self.tokenizer_manager = SimpleNamespace(
            event_loop=None, abort_request=lambda rid: None, rid_to_state={}
        )

    async def async_generate(self, rid, **_):
        async def outputs():
            for i in range(TOKENS):
                await asyncio.sleep(0)
                meta = {"prompt_tokens": 100, "completion_tokens": i + 1}
                if i == TOKENS - 1:
                    meta["finish_reason"] = {"type": "length", "length": TOKENS}
                yield {"output_ids": [1000 + i], "text": "x", "meta_info": meta}

        return outputs()


def backend():
    """The SGLang backend over the stand-in (``__init__`` would start a GPU engine)."""
    from transformers import AutoTokenizer

    from engine.backends.sglang import PendingAdapters, SGLangEngine
    from engine.base_model import resolve_base

    engine = object.__new__(SGLangEngine)
    engine.engine, engine.stop_ids, engine.context = StandInSGLang(), set(), 8192
    engine.tokenizer = AutoTokenizer.from_pretrained(resolve_base("smollm2"))
    engine.names, engine.adapter_paths = set(), {}
    engine.pending, engine.running, engine.adaptive = PendingAdapters({}), 0, False
    engine.aborted, engine.cut_at, engine.streams_on = {}, {}, collections.Counter()

    async def prompt_ids(_request):
        return list(range(100))

    engine.prompt_tokenizer = prompt_ids
    return engine


async def timed_rounds(repeats: int) -> list[float]:
    from engine.interface import GenerationRequest, SamplingParams

    engine = backend()

    async def one(i: int) -> int:
        params = SamplingParams(max_tokens=TOKENS, temperature=0.0)
        request = GenerationRequest(prompt="hi", params=params, request_id=f"r{i}")
        return sum([1 async for _ in engine.stream(request)])

    per_output = []
    for _ in range(repeats):
        cpu = time.process_time()
        chunks = await asyncio.gather(*(one(i) for i in range(STREAMS)))
        assert sum(chunks) == STREAMS * TOKENS
        per_output.append((time.process_time() - cpu) / (STREAMS * TOKENS) * 1e6)
    return per_output


def measure(repeats: int) -> None:
    samples = asyncio.run(timed_rounds(repeats))
    print(json.dumps({"us_per_output": statistics.median(samples), "samples": samples}))


def compare(trees: list[str], rounds: int, out: Path) -> None:
    named = [t.split("=", 1) for t in trees]
    results = {name: [] for name, _ in named}
    for number in range(1, rounds + 1):
        for name, folder in named:  # alternating: a busy machine slows every tree alike
            command = [sys.executable, str(Path(__file__).resolve()), "measure"]
            done = subprocess.run(
                command, cwd=folder, env={"PYTHONPATH": "."} | environment(),
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            value = json.loads(done.stdout.strip().splitlines()[-1])["us_per_output"]
            results[name].append(value)
            print(f"round {number}, {name}: {value:.1f} us per output", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"trees": dict(named), "us": results}, indent=1))
    (out / "results.md").write_text(markdown(named, results, rounds))
    print((out / "results.md").read_text())


def environment() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def markdown(named: list[list[str]], results: dict, rounds: int) -> str:
    first = named[0][0]
    lines = [
        "# The stream path's CPU per output (stand-in SGLang, no GPU)",
        "",
        f"{STREAMS} streams × {TOKENS} one-token outputs; each round runs every tree once, in "
        f"turn; median of 5 repeats per run, then median [min–max] over {rounds} rounds.",
        "",
        f"| tree | µs per output | ÷ {first} (per round) |",
        "|---|---|---|",
    ]
    for name, folder in named:
        values = results[name]
        ratios = [v / b for v, b in zip(values, results[first])]
        lines.append(
            f"| {name} (`{folder}`) | {statistics.median(values):.1f} "
            f"[{min(values):.1f}–{max(values):.1f}] | {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f}–{max(ratios):.2f}] |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    one = sub.add_parser("measure")
    one.add_argument("--repeats", type=int, default=5)
    many = sub.add_parser("compare")
    many.add_argument("--tree", action="append", required=True, metavar="NAME=DIR")
    many.add_argument("--rounds", type=int, default=5)
    many.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.action == "measure":
        measure(args.repeats)
    else:
        compare(args.tree, args.rounds, args.out)


if __name__ == "__main__":
    main()
