"""How long one request with ``n`` copies of a 2,100-token prompt takes against ``n`` = 1, on a
running CPU API (the hostile-input pass found each copy prefilled apart: a request of ``n`` = 16
held the worker 16 times as long).

    python -m engine.api --port 18978 --backend hf &
    python lab/n_copies_prefill.py --port 18978 \\
        --out results/serving/n-copies-prefill-cpu/after.json

``/v1/completions`` with ``max_tokens=1`` (the time is the prefill's), ``n`` = 1 and 4 alternated
``--rounds`` times after one warm-up; writes each time and the per-round ratio n=4 ÷ n=1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

PROMPT = "the cat sat on a mat. " * 300


def seconds(client: httpx.Client, url: str, n: int) -> float:
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 1, "n": n}
    start = time.perf_counter()
    client.post(url, json=body).raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    times: dict[int, list[float]] = {1: [], args.copies: []}
    with httpx.Client(timeout=600) as client:
        seconds(client, url, 1)
        for _ in range(args.rounds):
            for n in times:
                times[n].append(seconds(client, url, n))
    ratios = [b / a for a, b in zip(times[1], times[args.copies], strict=True)]
    result = {"seconds": {str(n): t for n, t in times.items()}, "ratios": ratios,
              "median": statistics.median(ratios), "range": [min(ratios), max(ratios)]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
