"""What our API's ASGI app costs the event loop per request and per streamed chunk, with no
sockets and no model (issue #16: at 256 streams every request waits behind these costs).

    python lab/asgi_cost.py --rounds 5 --out results/serving/asgi-cost-cpu/NAME [--tree DIR]

The app of ``python -m engine.api`` (``create_api``, the adapters of adapters.yaml) over
``NoModelEngine`` with no pause between tokens, called directly as ASGI: 50 streamed chat
requests at a time (100 words in), first 2,000 of one token (the request's cost), then 400 of
101 tokens (the rest divided by 100: a further chunk's cost). The ASGI ``send`` keeps nothing,
so socket writes are not in these figures. Each round is one such pass; the median and range
over rounds go to ``results.json`` and ``results.md``. ``--tree``: the API of another checkout
(``git archive REV engine loadtest adapters.yaml``, with ``adapters/`` linked in), to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCURRENT = 50


def build_app(tree: Path):
    """The API of the checkout at ``tree`` (its ``engine`` package is imported)."""
    sys.path.insert(0, str(tree))
    from engine.api import create_api
    from engine.registry import load_registry
    from loadtest.no_model import NoModelEngine

    registry = load_registry(tree / "adapters.yaml")
    base = registry.base.name or Path(registry.base.model).name
    engine = NoModelEngine(base, [a.name for a in registry.adapters], 0)
    return create_api(engine, registry), registry.adapters[0].name


def chat_body(model: str, max_tokens: int) -> bytes:
    words = " ".join(["word"] * 100)
    body = {"model": model, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": words}]}  # fmt: skip
    return json.dumps(body).encode()


def http_scope(body: bytes) -> dict:
    """A POST as uvicorn's httptools protocol presents it (ASGI spec 2.3)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}  # fmt: skip


async def one_request(app, body: bytes) -> int:
    """Events sent (the client never leaves)."""
    pending, sent = [{"type": "http.request", "body": body, "more_body": False}], 0

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.Event().wait()

    async def send(message):
        nonlocal sent
        sent += 1

    await app(http_scope(body), receive, send)
    return sent


async def seconds_for(app, body: bytes, requests: int) -> float:
    await one_request(app, body)
    t0 = time.perf_counter()
    for _ in range(requests // CONCURRENT):
        await asyncio.gather(*(one_request(app, body) for _ in range(CONCURRENT)))
    return time.perf_counter() - t0


def one_round(app, model: str) -> dict:
    short = asyncio.run(seconds_for(app, chat_body(model, 1), 2000)) / 2000
    long = asyncio.run(seconds_for(app, chat_body(model, 101), 400)) / 400
    return {"us_per_request": short * 1e6, "us_per_chunk": (long - short) / 100 * 1e6}


def summary(rounds: list[dict]) -> dict:
    out = {}
    for key in ("us_per_request", "us_per_chunk"):
        values = [r[key] for r in rounds]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def commit_of(tree: Path) -> str | None:
    """The checkout's commit, with ``+`` when its tracked files differ from it."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode or not (tree / ".git").exists():
        return None
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"]).returncode != 0
    return head.stdout.strip() + ("+" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--tree", type=Path, default=ROOT, help="the checkout whose API is measured"
    )
    args = parser.parse_args()
    tree = args.tree.resolve()
    app, model = build_app(tree)
    rounds = []
    for r in range(1, args.rounds + 1):
        rounds.append(one_round(app, model))
        print(f"round {r}: {rounds[-1]['us_per_request']:.0f} µs a request, "
              f"{rounds[-1]['us_per_chunk']:.1f} µs a further chunk", flush=True)  # fmt: skip
    result = {"tree": str(tree), "commit": commit_of(tree), "rounds": rounds, **summary(rounds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    s = result
    (args.out / "results.md").write_text(
        f"`{tree}` ({result['commit'] or 'not a git checkout'}), {len(rounds)} rounds: "
        f"**{s['us_per_request']['median']:.0f}** [{s['us_per_request']['min']:.0f}–"
        f"{s['us_per_request']['max']:.0f}] µs a request, **{s['us_per_chunk']['median']:.1f}** "
        f"[{s['us_per_chunk']['min']:.1f}–{s['us_per_chunk']['max']:.1f}] µs a further chunk\n"
    )
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
