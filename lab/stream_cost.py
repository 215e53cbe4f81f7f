"""What our SGLang backend's stream path costs the serving process per output, on the CPU, with
a stand-in for ``sglang.Engine`` (no GPU): 256 streams of 100 one-token outputs each, the CPU
time of the process per output. Compares source trees (this one and an exported older commit)
in alternating rounds:

    git archive e930aef engine pyproject.toml | (mkdir -p /tmp/old && tar x -C /tmp/old)
    python lab/stream_cost.py compare --tree e930aef=/tmp/old --tree now=. --rounds 5 \
        --out results/serving/stream-path-cpu-cost

``measure`` (run inside a tree, as ``compare`` does) prints one JSON line. The stand-in yields
outputs as SGLang's incremental streaming does (new ids, meta_info, the finish reason last), so
what is timed is our code from the request to the caller's last chunk: admission (the prompt of
~100 words tokenized by the backend's own ``PromptTokenizer``), ``DeltaTracker`` with the
SmolLM2 tokenizer, the abort checks, the request clock, the generator layers.

``--libraries DIR`` puts DIR first on the trees' path: the GPU runtime's tokenizers and
transformers, whose ``len(tokenizer)`` builds the whole vocabulary on every call, where the
tokenizers here (0.23) answer at once::

    pip install --no-deps --target /tmp/tok022 tokenizers==0.22.2 transformers==5.12.1 \
        'huggingface-hub>=1.5,<2'

Each run also records the libraries' versions, ``len(tokenizer)``'s time and a fixed Python
loop's (the same loop ``lab/h200.sh`` times on the GPU host).
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
LOOP = "s = 0\nfor i in range(10**7):\n    s += i\n"


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

    from engine.backends.common import PromptTokenizer
    from engine.backends.sglang import PendingAdapters, SGLangEngine
    from engine.base_model import resolve_base

    engine = object.__new__(SGLangEngine)
    engine.engine, engine.stop_ids, engine.context = StandInSGLang(), set(), 8192
    engine.tokenizer = AutoTokenizer.from_pretrained(resolve_base("smollm2"))
    engine.names, engine.adapter_paths = set(), {}
    engine.pending, engine.running, engine.adaptive = PendingAdapters({}), 0, False
    engine.aborted, engine.cut_at, engine.streams_on = {}, {}, collections.Counter()
    engine.prompt_tokenizer = PromptTokenizer(
        engine.tokenizer, resolve_base("smollm2"), False, engine.context
    )
    return engine


async def timed_rounds(repeats: int) -> list[float]:
    from engine.interface import GenerationRequest, SamplingParams

    engine = backend()
    words = " ".join(["the quick brown fox jumps over the lazy dog and runs"] * 10)

    async def one(i: int) -> int:
        params = SamplingParams(max_tokens=TOKENS, temperature=0.0)
        prompt = f"Continue this text: {words}"
        request = GenerationRequest(prompt=prompt, params=params, request_id=f"r{i}")
        return sum([1 async for _ in engine.stream(request)])

    per_output = []
    for _ in range(repeats):
        cpu = time.process_time()
        chunks = await asyncio.gather(*(one(i) for i in range(STREAMS)))
        assert sum(chunks) == STREAMS * TOKENS
        per_output.append((time.process_time() - cpu) / (STREAMS * TOKENS) * 1e6)
    return per_output


def libraries() -> dict:
    """The versions that decide the per-request cost, ``len(tokenizer)`` timed (SmolLM2's), and a
    fixed Python loop's time (hosts differ: ``lab/h200.sh`` records the same loop)."""
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    from engine.base_model import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base("smollm2"))
    began = time.perf_counter()
    for _ in range(20):
        len(tokenizer)
    length_ms = (time.perf_counter() - began) / 20 * 1e3
    began = time.perf_counter()
    exec(LOOP, {})  # at module level, as lab/h200.sh runs it: global names, not locals
    loop_s = time.perf_counter() - began
    versions = {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__}
    return {**versions, "len_tokenizer_ms": length_ms, "loop_1e7_s": loop_s}


def measure(repeats: int) -> None:
    samples = asyncio.run(timed_rounds(repeats))
    median = statistics.median(samples)
    print(json.dumps({"us_per_output": median, "samples": samples, **libraries()}))


def compare(trees: list[str], rounds: int, out: Path, libraries_dir: Path | None = None) -> None:
    named = [t.split("=", 1) for t in trees]
    path = ":".join(p for p in (".", libraries_dir and str(libraries_dir.resolve())) if p)
    results, versions, extras = {name: [] for name, _ in named}, set(), []
    for number in range(1, rounds + 1):
        for name, folder in named:  # alternating: a busy machine slows every tree alike
            command = [sys.executable, str(Path(__file__).resolve()), "measure"]
            done = subprocess.run(
                command, cwd=folder, env={"PYTHONPATH": path} | environment(),
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            value = measured["us_per_output"]
            results[name].append(value)
            versions.add(
                f"tokenizers {measured['tokenizers']}, transformers {measured['transformers']}"
            )
            extras.append({k: measured[k] for k in ("len_tokenizer_ms", "loop_1e7_s")})
            print(f"round {number}, {name}: {value:.1f} us per output", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    found = "; ".join(sorted(versions))
    record = {"trees": dict(named), "libraries": found, "us": results, "per_run": extras}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    (out / "results.md").write_text(markdown(named, results, rounds, found, extras))
    print((out / "results.md").read_text())


def environment() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def markdown(
    named: list[list[str]], results: dict, rounds: int, libraries: str, extras: list[dict]
) -> str:
    length = sorted(e["len_tokenizer_ms"] for e in extras)
    loop = sorted(e["loop_1e7_s"] for e in extras)
    first = named[0][0]
    lines = [
        "# The stream path's CPU per output (stand-in SGLang, no GPU)",
        "",
        f"{STREAMS} streams × {TOKENS} one-token outputs; each round runs every tree once, in "
        f"turn; median of 5 repeats per run, then median [min–max] over {rounds} rounds.",
        f"{libraries}: `len(tokenizer)` {statistics.median(length):.3f} ms "
        f"[{length[0]:.3f}–{length[-1]:.3f}]; a Python loop of 1e7 additions "
        f"{statistics.median(loop):.2f} s [{loop[0]:.2f}–{loop[-1]:.2f}] (per run, every tree).",
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
    many.add_argument("--libraries", type=Path, help="a folder first on the trees' path")
    args = parser.parse_args()
    if args.action == "measure":
        measure(args.repeats)
    else:
        compare(args.tree, args.rounds, args.out, args.libraries)


if __name__ == "__main__":
    main()
