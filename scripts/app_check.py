"""Start ``python app.py`` as a user would, and check that its UI and its API answer.

    python scripts/app_check.py --out app_check.json                   # the CPU default
    python scripts/app_check.py --backend sglang --out $OUT/app.json   # on a GPU (SGLang)
    python scripts/app_check.py --url http://127.0.0.1:7860 --expect-backend sglang  # one running

Checks, against the adapters of ``--config``: ``/health``; ``/v1/models`` lists the base and every
adapter; a streamed chat completion from the first adapter (SSE chunks, usage, ``[DONE]``); an
unknown model is a 404 with an OpenAI error body; the UI page is served; the UI's ``/compare``
(fine-tuned vs base on the adapter's first example) and ``/chat`` answer through gradio_client.
With ``--url`` it checks an app already running there (a Space, or its rehearsal) instead of
starting one; ``--expect-backend`` fails the check when ``/health`` names another backend.
Writes a JSON report and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key_header() -> dict[str, str]:
    """What a ``LORALAND_API_KEY`` set here asks of every ``/v1`` request (the app inherits it)."""
    key = os.environ.get("LORALAND_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def post(url: str, body: dict) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **key_header()}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get_json(url: str) -> dict:
    request = urllib.request.Request(url, headers=key_header())
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def api_checks(url: str, base_id: str, adapters: list[str]) -> dict:
    health = get_json(f"{url}/health")
    models = {m["id"] for m in get_json(f"{url}/v1/models")["data"]}
    body = {
        "model": adapters[0],
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, raw = post(f"{url}/v1/chat/completions", body)
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    unknown, error = post(f"{url}/v1/chat/completions", {**body, "model": "no-such-adapter"})
    return {
        "health_ok": health.get("ok") is True,
        "backend": health.get("backend"),
        "models_listed": {base_id, *adapters} <= models,
        "stream_status": status,
        "stream_chunks": len(chunks),
        "stream_usage": next((c["usage"] for c in chunks if c.get("usage")), None),
        "stream_done": bool(events) and events[-1] == "[DONE]",
        "unknown_model_status": unknown,
        "unknown_model_error": json.loads(error).get("error", {}).get("type"),
    }


def ui_checks(url: str, spec) -> dict:
    from gradio_client import Client

    from app import MAX_FIELDS
    from engine.registry import template_fields

    with urllib.request.urlopen(f"{url}/", timeout=300) as response:
        page = response.read().decode()
    client = Client(f"{url}/", verbose=False)
    example = spec.examples[0] if spec.examples else {}
    fields = [example.get(f, "x") for f in template_fields(spec.template)]
    fields += [""] * (MAX_FIELDS - len(fields))
    tuned, tuned_stats, base, base_stats = client.predict(spec.name, *fields, api_name="/compare")
    history = []
    for message in ("Say hello.", "Again, please.", "Once more."):
        history = client.predict(message, history, spec.name, api_name="/chat")
    replies = [m for m in history if m["role"] == "assistant"]
    return {
        "page_is_gradio": "gradio" in page.lower(),
        "compare_both_answered": bool(tuned) and bool(base),
        "compare_timings_shown": all("TTFT" in s for s in (tuned_stats, base_stats)),
        "chat_answered": len(replies) == 3 and all(chat_text(m) for m in replies),
    }


def chat_text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def passed(report: dict, expect_backend: str | None = None) -> bool:
    api, ui = report["api"], report["ui"]
    return (
        api["health_ok"]
        and expect_backend in (None, api["backend"])
        and api["models_listed"]
        and api["stream_status"] == 200
        and api["stream_chunks"] > 1
        and api["stream_done"]
        and api["unknown_model_status"] == 404
        and api["unknown_model_error"] is not None
        and all(ui.values())
    )


def main() -> None:
    from engine.registry import load_registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "adapters.yaml"))
    parser.add_argument("--backend", choices=["auto", "hf", "sglang"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("app_check.json"))
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--url", help="check the app running there instead of starting one")
    parser.add_argument("--expect-backend", choices=["hf", "sglang"])
    args = parser.parse_args()
    registry = load_registry(args.config)
    if args.url:
        report = {"command": f"running at {args.url}"}
        report |= checks(args.url.rstrip("/"), registry)
    else:
        report = start_and_check(args, registry)
    report["expect_backend"] = args.expect_backend
    report["passed"] = passed(report, args.expect_backend)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["passed"] else 1)


def checks(url: str, registry) -> dict:
    names = [a.name for a in registry.adapters]
    api = api_checks(url, get_json(f"{url}/health")["base_model"], names)
    return {"api": api, "ui": ui_checks(url, registry.adapters[0])}


def start_and_check(args, registry) -> dict:
    from loadtest.sweep import start_server

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "app.py", "--config", args.config, "--port", str(port)]
    cmd += ["--backend", args.backend]
    started = time.perf_counter()
    app = start_server(cmd, f"{url}/get_model_info", timeout_s=args.start_timeout)  # asks no key
    try:
        report = {"command": " ".join(cmd), "start_s": round(time.perf_counter() - started, 1)}
        return report | checks(url, registry)
    finally:
        app.terminate()
        app.wait(60)


if __name__ == "__main__":
    main()
