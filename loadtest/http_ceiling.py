"""How many streamed tokens per second the HTTP path carries with no model behind it.

    python -m loadtest.http_ceiling --target client --users 32,128,256 --token-gap-ms 11 \
        --out results/serving/http-ceiling/client-gap-11ms
    python -m loadtest.http_ceiling --target api --users 32,128,256 --token-gap-ms 11 \
        --out results/serving/http-ceiling/api-gap-11ms

Runs ``loadtest.sweep`` (the Locust user of every HTTP benchmark) against a server in its own
process that streams ``max_tokens`` chunks per request, at once or one per ``--token-gap-ms``
step (a GPU's inter-token latency: each chunk then reaches the client in its own read, as from
a real engine). ``--target client``: a minimal ASGI app sending the bytes our API sends, so the
point's ceiling is the Locust client's. ``--target api``: our own API (``engine.api``, as
``python app.py`` serves it, for the adapters of ``adapters.yaml``) over ``NoModelEngine``
(``loadtest/no_model.py``), which gives every open stream one token per step like a GPU batch
step, so the ceiling is the API's own cost per token. Each point records its output tok/s with
the Locust and server cores busy: an HTTP benchmark of a real engine reading near these ceilings
measures the HTTP path, not the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import uvicorn

from engine.api import create_api
from engine.api.protocol import sse
from engine.paths import work_dir
from engine.registry import load_registry
from loadtest.no_model import NoModelEngine
from loadtest.procs import start_server

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"object": "list", "data": [{"id": "base"}, {"id": "a1", "parent": "base"}]}


async def app(scope, receive, send) -> None:
    """``GET /v1/models`` and ``POST /v1/chat/completions`` (stream) only."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/v1/models":
        await respond(send, "application/json", paced([json.dumps(MODELS).encode()]))
    elif scope["path"] == "/v1/chat/completions":
        await respond(send, "text/event-stream", paced(events(json.loads(body))), receive)
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def respond(send, media_type: str, parts, receive=None) -> None:
    """Send ``parts``; stop when the client leaves (Locust cuts its streams at a point's end)."""
    gone = asyncio.ensure_future(receive()) if receive else asyncio.Future()
    headers = [(b"content-type", media_type.encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    try:
        async for part in parts:
            if gone.done():
                return
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        gone.cancel()


async def paced(parts):
    gap = float(os.environ.get("CEILING_TOKEN_GAP_MS", "0")) / 1000
    for part in parts:
        yield part
        if gap:
            await asyncio.sleep(gap)


def events(request: dict):
    head = {"id": "chatcmpl-ceiling", "object": "chat.completion.chunk", "created": 0,
            "model": request["model"]}  # fmt: skip
    tokens = int(request.get("max_tokens", 16))
    for i in range(tokens):
        choice = {"index": 0, "delta": {"content": " word"}, "finish_reason": None}
        if i == tokens - 1:
            choice["finish_reason"] = "length"
        yield sse({**head, "choices": [choice]})
    usage = {"prompt_tokens": 100, "completion_tokens": tokens, "total_tokens": 100 + tokens}
    yield sse({**head, "choices": [], "usage": usage})
    yield sse("[DONE]")


def serve_api(port: int, gap_s: float) -> None:
    """Our API for the adapters of adapters.yaml, over ``NoModelEngine`` (``--target api``)."""
    registry = load_registry(ROOT / "adapters.yaml")
    base = registry.base.name or Path(registry.base.model).name
    engine = NoModelEngine(base, [a.name for a in registry.adapters], gap_s)
    uvicorn.run(create_api(engine, registry), host="127.0.0.1", port=port, log_level="warning")


def start_ceiling_server(target: str, port: int, token_gap_ms: float) -> subprocess.Popen:
    if target == "api":
        cmd = [sys.executable, "-m", "loadtest.http_ceiling", "--serve-api", str(port)]
    else:
        cmd = [
            sys.executable, "-m", "uvicorn", "loadtest.http_ceiling:app", "--port", str(port),
            "--lifespan", "off", "--log-level", "warning",
        ]  # fmt: skip
    env = os.environ | {"CEILING_TOKEN_GAP_MS": str(token_gap_ms)}
    return start_server(cmd, f"http://127.0.0.1:{port}/v1/models", timeout_s=120, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=["client", "api"], default="client")
    parser.add_argument("--users", default="32,128,256")
    parser.add_argument("--duration", type=int, default=20, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--output-tokens", default="90-110")
    parser.add_argument("--token-gap-ms", type=float, default=0, help="pause between chunks")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--out", default=str(work_dir() / "http-ceiling"))
    parser.add_argument("--serve-api", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_api:
        gap_ms = float(os.environ.get("CEILING_TOKEN_GAP_MS", "0"))
        return serve_api(args.serve_api, gap_ms / 1000)
    server = start_ceiling_server(args.target, args.port, args.token_gap_ms)
    try:
        cmd = [
            sys.executable, "-m", "loadtest.sweep", "--host", f"http://127.0.0.1:{args.port}",
            "--server-pid", str(server.pid), "--adapters", "1", "--users", args.users,
            "--duration", str(args.duration), "--warmup", str(args.warmup),
            "--prompt-words", "5", "--output-tokens", args.output_tokens, "--out", args.out,
        ]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
