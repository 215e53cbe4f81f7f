"""How long a running stream waits between its tokens while a long prompt is prefilled, a chunk a
step, on the CPU default: each chunk the same size (``prefill_tokens``), against chunks that
shrink as the prompt's context grows (``engine.backends.hf.chunk_tokens``), alternated in one
engine ``--pairs`` times.

    python lab/long_prompt_stall.py --prompt-tokens 6000 --pairs 3 \\
        --out results/serving/long-prompt-stall-cpu

After a warm-up round, each round: a stream on the base model decodes (``ignore_eos``); a
``--prompt-tokens`` prompt (random words, one token to answer) is sent; the gaps between the
stream's tokens from then until the long prompt's answer are recorded. Writes ``stall.json`` and
``stall.md``: the longest gap and the long prompt's time to its answer, each arm's median [range]
over rounds, and the per-round ratio shrinking ÷ fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import GenerationRequest, SamplingParams

ARMS = ("fixed", "shrinking")


def long_prompt(engine, tokens: int, rng: random.Random) -> str:
    vocab = [engine.tokenizer.decode([rng.randrange(1000, 40000)]).strip() for _ in range(tokens)]
    text = " ".join(word or "a" for word in vocab)
    while len(engine.tokenizer.encode(text)) > tokens:
        text = text[: int(len(text) * 0.95)]
    return text


async def one_round(engine, prompt: str) -> dict:
    running = engine.stream(
        GenerationRequest(prompt="Once upon a time",
                          params=SamplingParams(max_tokens=2000, ignore_eos=True))
    )  # fmt: skip
    await anext(running)
    long = GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=1))
    sent = time.perf_counter()
    answer = asyncio.ensure_future(engine.complete(long))
    gaps, last = [], time.perf_counter()
    while not answer.done():
        await anext(running)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    answered_s = time.perf_counter() - sent
    await answer
    await running.aclose()
    return {"max_gap_s": max(gaps), "p50_gap_s": statistics.median(gaps),
            "tokens_meanwhile": len(gaps), "long_answer_s": answered_s}  # fmt: skip


def stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def report(rounds: list[dict], args) -> tuple[dict, str]:
    arms = {arm: [r[arm] for r in rounds] for arm in ARMS}
    figures = ("max_gap_s", "p50_gap_s", "long_answer_s", "tokens_meanwhile")
    summary = {arm: {f: stat([r[f] for r in arms[arm]]) for f in figures} for arm in ARMS}
    ratios = {f: stat([r["shrinking"][f] / r["fixed"][f] for r in rounds]) for f in figures}
    lines = [f"`python lab/long_prompt_stall.py --prompt-tokens {args.prompt_tokens} "
             f"--pairs {args.pairs}`", "",
             f"A running stream's gaps while a {args.prompt_tokens}-token prompt is prefilled "
             f"(`prefill_tokens` {args.prefill_tokens}), median [range] over {args.pairs} "
             "alternated rounds in one engine:", "",
             "| figure | fixed chunks | shrinking chunks | shrinking ÷ fixed, per round |",
             "|---|---|---|---|"]  # fmt: skip
    for f in figures:
        a, b, r = summary["fixed"][f], summary["shrinking"][f], ratios[f]
        cell = lambda s: f"{s['median']:.2f} [{s['min']:.2f}–{s['max']:.2f}]"  # noqa: E731
        lines.append(f"| {f} | {cell(a)} | {cell(b)} | {cell(r)} |")
    return {"rounds": rounds, "summary": summary, "ratios": ratios}, "\n".join(lines) + "\n"


async def run(args) -> None:
    from engine.backends.hf import HFEngine
    from engine.base_model import resolve_base
    from engine.registry import HFSettings

    engine = HFEngine(resolve_base("smollm2"), "SmolLM2-135M-Instruct",
                      settings=HFSettings(prefill_tokens=args.prefill_tokens))  # fmt: skip
    balance = engine.attention_balance
    prompt = long_prompt(engine, args.prompt_tokens, random.Random(0))
    rounds = []
    try:
        await one_round(engine, prompt)  # warm-up: the first long prompt's tokenizing and more
        for n in range(args.pairs):
            result = {}
            for arm in ARMS if n % 2 == 0 else ARMS[::-1]:
                engine.attention_balance = balance if arm == "shrinking" else None
                result[arm] = await one_round(engine, prompt)
                print(f"round {n + 1} {arm}: {json.dumps(result[arm])}", flush=True)
            rounds.append(result)
    finally:
        await engine.shutdown()
    write(rounds, args)


def write(rounds: list[dict], args) -> None:
    data, text = report(rounds, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stall.json").write_text(json.dumps(data, indent=1))
    (args.out / "stall.md").write_text(text)
    plot(rounds, args.out / "stall.png")
    print(text)


def plot(rounds: list[dict], path: Path) -> None:
    """Each round's longest and median wait of the running stream, by arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.2
    for i, (arm, figure) in enumerate([(a, f) for a in ARMS for f in ("max_gap_s", "p50_gap_s")]):
        xs = [n + (i - 1.5) * width for n in range(len(rounds))]
        ax.bar(xs, [r[arm][figure] for r in rounds], width, label=f"{arm}: {figure[:3]} wait")
    ax.set_xticks(range(len(rounds)), [f"round {n + 1}" for n in range(len(rounds))])
    ax.set_ylim(0, 1.45 * max(r[arm]["max_gap_s"] for r in rounds for arm in ARMS))  # legend
    ax.set_ylabel("seconds between the stream's tokens")
    ax.set_title("A running stream while a long prompt is prefilled (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=6000)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--from-json", type=Path, help="write the report again from a stall.json")
    args = parser.parse_args()
    if args.from_json:
        write(json.loads(args.from_json.read_text())["rounds"], args)
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
