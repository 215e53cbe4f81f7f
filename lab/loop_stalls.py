"""How long one hostile request holds a running server's event loop: a probe asks ``GET
/v1/models`` every 50 ms while each suspect request is sent, alone, ``--repeats`` times; the
probe's slowest answer during a suspect against its slowest with none running.

    python -m engine.api --port 18961 --backend hf &   # the server under test, CPU default
    python lab/loop_stalls.py --url http://127.0.0.1:18961 --out out/loop-stalls/after.json

``--report A.json B.json`` writes a table of the two runs (before, after) beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx

PROBE_EVERY_S = 0.05


def patterns(count: int) -> dict:
    """A ``response_format`` of ``count`` pattern properties, salted so no cache answers it."""
    salt = random.randrange(10**9)
    props = {f"^x{salt}_{i}[a-z]*$": {"type": "string"} for i in range(count)}
    schema = {"type": "object", "patternProperties": props}
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def suspects() -> dict[str, tuple[str, bytes]]:
    """Name → (route, body): each a 4xx or a short answer, found by a stall hunt."""

    def body(value: dict) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    nested = "[" * 950 + "]" * 950
    return {
        "schema-300-patterns": ("/v1/completions", body({
            "model": "base", "prompt": "hi", "max_tokens": 2, "response_format": patterns(300)})),
        "300k-bad-messages": ("/v1/chat/completions", body({
            "model": "base", "messages": [{}] * 300_000})),
        "nested-lists-1mib": ("/v1/chat/completions", (
            '{"model":"base","x":[' + ",".join([nested] * 540) + "]}").encode()),
        "64-copies-of-long-prompts": ("/v1/completions", body({
            "model": "base", "prompt": ["\U0001f600" * 8192] * 16, "n": 4, "max_tokens": 1})),
    }  # fmt: skip


async def probe(client: httpx.AsyncClient, until: float, seen: list[tuple[float, float]]):
    while time.monotonic() < until:
        sent = time.monotonic()
        await client.get("/v1/models")
        seen.append((sent, time.monotonic() - sent))
        await asyncio.sleep(PROBE_EVERY_S)


async def measure(url: str, repeats: int) -> dict:
    results = {}
    async with (
        httpx.AsyncClient(base_url=url, timeout=600) as probing,
        httpx.AsyncClient(base_url=url, timeout=600) as sending,
    ):
        for name, (route, _) in suspects().items():
            seen: list[tuple[float, float]] = []
            windows, statuses = [], []
            task = asyncio.create_task(probe(probing, float("inf"), seen))
            await asyncio.sleep(2)
            for _ in range(repeats):
                route, content = suspects()[name]  # a fresh salt each time
                start = time.monotonic()
                answer = await sending.post(
                    route, content=content, headers={"content-type": "application/json"}
                )
                windows.append((start, time.monotonic()))
                statuses.append(answer.status_code)
                await asyncio.sleep(1.5)
            task.cancel()
            inside = [[lat for sent, lat in seen if a - 0.1 <= sent <= b] for a, b in windows]
            idle = [lat for sent, lat in seen if not any(a - 0.1 <= sent <= b + 0.5
                                                          for a, b in windows)]  # fmt: skip
            results[name] = {
                "statuses": statuses,
                "suspect_s": [round(b - a, 3) for a, b in windows],
                "probe_max_during_s": [round(max(v), 3) if v else None for v in inside],
                "probe_max_idle_s": round(max(idle), 3) if idle else None,
                "probe_median_idle_s": round(statistics.median(idle), 4) if idle else None,
            }
            print(name, json.dumps(results[name]), flush=True)
    return results


def report(before: Path, after: Path) -> str:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    lines = [
        f"Slowest `GET /v1/models` while each suspect ran, median [range] of "
        f"{len(b['results'][next(iter(b['results']))]['suspect_s'])} repeats "
        f"(`{before.name}`: {a['label']}; `{after.name}`: {b['label']}).",
        "",
        "| suspect | before | after | after's status | after's probe max with none running |",
        "|---|---|---|---|---|",
    ]
    for name, got in b["results"].items():
        old = a["results"][name]

        def cell(r: dict) -> str:
            v = [x for x in r["probe_max_during_s"] if x is not None]
            return f"{statistics.median(v):.3f} s [{min(v):.3f}–{max(v):.3f}]" if v else "—"

        lines.append(f"| {name} | {cell(old)} | {cell(got)} | {got['statuses'][0]} | "
                     f"{got['probe_max_idle_s']} s |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--label", default="")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.report:
        text = report(*args.report)
        (args.report[1].parent / "results.md").write_text(text)
        print(text)
        return
    results = asyncio.run(measure(args.url, args.repeats))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"label": args.label, "results": results}, indent=1))


if __name__ == "__main__":
    main()
