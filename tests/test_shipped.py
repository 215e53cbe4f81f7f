"""The shipped adapters as a user meets them: the README's API examples, the CLI, the app and the
API agreeing on one input, and the load test with its defaults against the shipped app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
REVIEW = "A joyless slog."


@pytest.fixture(scope="module")
def shipped():
    """``python app.py``'s app (API + UI) over the shipped adapters, on the CPU default."""
    import asyncio

    from conftest import LiveServer

    from app import create_app
    from engine import build_engine
    from engine.registry import load_registry

    registry = load_registry(ROOT / "adapters.yaml")
    engine = build_engine(registry, backend="hf")
    live = LiveServer(create_app(engine, registry, ROOT))
    yield live
    live.stop()
    asyncio.run(engine.shutdown())


def readme_block(language: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"```{language}\n") + len(language) + 4
    return text[start : text.index("```", start)]


def test_the_readme_openai_example_answers_rotten(shipped):
    code = readme_block("python").replace("http://127.0.0.1:7860", shipped.url)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "rotten"


def test_the_api_fills_the_adapters_template_unless_asked_for_raw(shipped):
    def ask(**extra):
        body = {"model": "sentiment", "messages": [{"role": "user", "content": REVIEW}]} | extra
        reply = httpx.post(f"{shipped.url}/v1/chat/completions", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        return reply.json()

    templated = ask()
    assert templated["choices"][0]["message"]["content"] == "rotten"
    assert ask(template_fields={"review": REVIEW})["choices"][0]["message"]["content"] == "rotten"
    raw = ask(prompt_template="raw", max_tokens=8)
    assert raw["usage"]["prompt_tokens"] < templated["usage"]["prompt_tokens"]
    wrong = httpx.post(
        f"{shipped.url}/v1/chat/completions",
        json={"model": "sentiment", "messages": [], "template_fields": {"text": REVIEW}},
    )
    assert wrong.status_code == 400 and "review" in wrong.json()["error"]["message"]


def test_the_cli_fills_the_template_too():
    done = subprocess.run(
        [sys.executable, "-m", "engine", "--backend", "hf", "--adapter", "sentiment", REVIEW],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "rotten"


def test_the_app_and_the_api_give_the_same_answer_for_the_same_adapter_and_input(shipped):
    from gradio_client import Client

    client = Client(f"{shipped.url}/", verbose=False)
    tuned, _, _, _ = client.predict("spam", "Free entry! Txt WIN to 80086 now", "", "", "",
                                    api_name="/compare")  # fmt: skip
    body = {
        "model": "spam",
        "messages": [{"role": "user", "content": "Free entry! Txt WIN to 80086 now"}],
    }
    api = httpx.post(f"{shipped.url}/v1/chat/completions", json=body, timeout=300).json()
    assert api["choices"][0]["message"]["content"] == tuned
    history = client.predict("Free entry! Txt WIN to 80086 now", [], "spam", api_name="/chat")
    reply = history[-1]["content"]
    reply = reply if isinstance(reply, str) else "".join(p["text"] for p in reply)
    assert reply == tuned


def test_locust_with_its_defaults_runs_against_the_shipped_app(shipped, tmp_path):
    cmd = [
        sys.executable, "-m", "locust", "-f", "loadtest/", "--host", shipped.url, "--headless",
        "-u", "2", "-r", "2", "-t", "8s", "--stop-timeout", "60", "--raw-out",
        str(tmp_path / "raw.jsonl"), "--output-tokens", "4", "--prompt-words", "5",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert records and all(r["ok"] for r in records), records[:3]
    served = {"address", "news", "sentiment", "spam", "sql"}
    assert {r["model"] for r in records} <= served
    assert "models in play: address, news, sentiment, spam, sql" in done.stderr


def test_a_load_test_that_cannot_start_says_why_and_stops(tmp_path):
    cmd = [
        sys.executable, "-m", "locust", "-f", "loadtest/", "--host", "http://127.0.0.1:9",
        "--headless", "-u", "2", "-r", "2", "-t", "30s", "--raw-out", str(tmp_path / "raw.jsonl"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "load test not started" in done.stderr
    assert "HTTP 4" not in done.stderr and "Input should be" not in done.stderr
