"""The Gradio app: gradio_client against a launched demo, a real headless Chromium click, and
``python app.py`` started as a process (scripts/app_check.py: UI and API)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app import build_demo, create_app

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def demo_client(engine, registry):
    """The app's UI served on a free port, and a Gradio client of it."""
    from gradio_client import Client

    demo = build_demo(engine, registry)
    demo.queue(default_concurrency_limit=8)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, ssr_mode=False)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def test_side_by_side_run_returns_both_answers_and_timings(hf_engine, registry_for):
    with demo_client(hf_engine, registry_for) as client:
        tuned, tuned_stats, base, base_stats = client.predict(
            "alpha", "A joyless slog.", "", "", "", api_name="/compare"
        )
        assert tuned and base and tuned != base
        for stats in (tuned_stats, base_stats):
            assert "TTFT" in stats and "tok/s" in stats and "finish:" in stats
        table = client.predict("A joyless slog.", api_name="/every_adapter")
        rows = {row[0]: row for row in table["data"]}
        assert set(rows) == {"alpha", "beta", "base"}
        for _, answer, ttft, probability in rows.values():
            assert answer and float(ttft) > 0 and probability.endswith("%")
        history = []
        for turn, message in enumerate(["Say hi.", "Name a colour.", "And another one."], 1):
            history = client.predict(message, history, "base", api_name="/chat")
            assert [m["role"] for m in history] == ["user", "assistant"] * turn
            assert chat_text(history[-1]) and chat_text(history[-2]) == message


def test_the_chat_sends_a_task_adapter_each_message_alone_and_the_base_its_history(
    hf_engine, registry_for
):
    """A task adapter (a template around the message) was trained on one message: the chat
    tab's second turn sends it that message alone; the base model gets the conversation."""
    sent = []
    stream = hf_engine.stream

    def recorded(request):
        sent.append((request.adapter, [m["content"] for m in request.messages]))
        return stream(request)

    hf_engine.stream = recorded
    try:
        with demo_client(hf_engine, registry_for) as client:
            for name in ("alpha", "base"):
                history = client.predict("A joyless slog.", [], name, api_name="/chat")
                client.predict("A quiet triumph.", history, name, api_name="/chat")
    finally:
        del hf_engine.stream
    alpha, base = [messages for _, messages in sent[:2]], [messages for _, messages in sent[2:]]
    assert alpha[1] == ["Is this review positive or negative?\nA quiet triumph."]
    assert len(base[1]) == 3
    assert (base[1][0], base[1][2]) == ("A joyless slog.", "A quiet triumph.")


def chat_text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def chromium_path() -> str:
    """Debian's chromium, installed here if missing (root + apt); skip where it cannot be."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Debian chromium is not installed and apt-get as root is not available")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode:
            pytest.skip(f"could not install chromium: {done.stderr[-300:]}")
    return shutil.which("chromium") or pytest.skip("chromium installed but not on PATH")


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CLEARED = """() => ['#tuned-output textarea', '#base-output textarea'].every(
    s => document.querySelector(s).value === '')"""
BOT_MESSAGES = "#chatbot .message.bot"


WATCH_THE_BOX = """() => { window.boxHeld = false; new MutationObserver(() => {
    const box = document.querySelector('#chat-input textarea');
    if (box && box.disabled) window.boxHeld = true;
}).observe(document.body, {subtree: true, childList: true, attributes: true}); }"""
"""Records whether the chat box was ever disabled after it runs (DOM changes, not timing)."""


def chat_in_the_browser(page, messages: list[str]) -> tuple[list[str], list[bool]]:
    """Send each message in the Chat tab; return the assistant's replies as shown, and per turn
    whether the box was held (disabled) before the reply ended."""
    page.get_by_role("tab", name="Chat").click()
    box = page.locator("#chat-input textarea")
    held = []
    for turn, message in enumerate(messages, 1):
        box.fill(message)
        page.evaluate(WATCH_THE_BOX)
        box.press("Enter")
        page.wait_for_function(
            f"() => document.querySelectorAll('{BOT_MESSAGES}').length >= {turn}"
            f" && document.querySelector('#chat-input textarea').value === ''",
            timeout=120_000,
        )
        page.wait_for_function(  # the reply has stopped growing, the box is free again
            "() => !document.querySelector('#chatbot .pending')"
            " && !document.querySelector('#chat-input textarea').disabled",
            timeout=120_000,
        )
        held.append(page.evaluate("() => window.boxHeld"))
    return [m.inner_text() for m in page.locator(BOT_MESSAGES).all()], held


def app_page(playwright, executable: str, url: str):
    """Chromium on the app at ``url``, its UI built (the Run button shown)."""
    browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url + "/", wait_until="domcontentloaded")
    page.wait_for_selector("#run", timeout=60_000)
    return browser, page


BOTH_FINISHED = """() => ['#tuned-stats', '#base-stats'].every(
    s => document.querySelector(s) && document.querySelector(s).innerText.includes('finish'))"""


def test_browser_picks_an_adapter_runs_and_sees_both_panels(hf_engine, registry_for, tmp_path):
    pytest.importorskip("playwright")
    from conftest import LiveServer
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    live = LiveServer(create_app(hf_engine, registry_for, tmp_path))
    shot = Path(os.environ.get("LORALAND_SCREENSHOT", tmp_path / "app.png"))
    try:
        with sync_playwright() as p:
            browser, page = app_page(p, executable, live.url)
            page.get_by_label("Adapter", exact=True).click()
            page.get_by_role("option", name="beta").click()
            page.wait_for_selector("#adapter-card:has-text('beta')")
            page.wait_for_function(  # the example the menu shows is in the fields already
                "() => document.querySelector('#field-1 textarea').value.length > 0"
            )
            shown = page.get_by_label("Examples").input_value()
            filled = [page.locator(f"#field-{i} textarea").input_value() for i in (0, 1)]
            page.locator("#run").click()
            page.wait_for_function(BOTH_FINISHED, timeout=120_000)
            tuned = page.locator("#tuned-output textarea").input_value()
            base = page.locator("#base-output textarea").input_value()
            page.screenshot(path=str(shot), full_page=True)
            page.get_by_label("Adapter", exact=True).click()
            page.get_by_role("option", name="alpha").click()
            page.wait_for_selector("#adapter-card:has-text('alpha')")
            page.wait_for_function(CLEARED, timeout=30_000)  # no answers of the last adapter
            turns, held = chat_in_the_browser(page, ["Say hi.", "Name a colour.", "Another."])
            browser.close()
    finally:
        live.stop()
    assert tuned and base
    assert sorted(shown.split(" | ")) == sorted(filled)
    assert shot.stat().st_size > 10_000
    assert len(turns) == 3 and all(turns) and not any("Error" in t for t in turns)
    assert held == [True, True, True]  # no message can be sent (and dropped) mid-reply


BOX_FREE = "() => !document.querySelector('#chat-input textarea').disabled"


def test_browser_chat_recovers_from_errors_and_its_menu_lists_an_adapter_hot_loaded_since(
    hf_engine, registry_for, adapter_dirs, tmp_path
):
    """Gradio 6.31 runs no ``.then`` after an error: an empty or too-long message held the chat
    box until a reload. And an adapter hot-loaded after the UI was built was in no menu."""
    pytest.importorskip("playwright")
    from conftest import LiveServer
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    live = LiveServer(create_app(hf_engine, registry_for, tmp_path))
    asyncio.run(hf_engine.load_adapter("gamma", adapter_dirs["alpha"]))
    try:
        with sync_playwright() as p:
            browser, page = app_page(p, executable, live.url)
            page.get_by_role("tab", name="Chat").click()
            box = page.locator("#chat-input textarea")
            box.fill("   ")
            box.press("Enter")
            page.get_by_text("Type a message first.").wait_for(timeout=60_000)
            page.wait_for_function(BOX_FREE, timeout=60_000)
            page.evaluate(WATCH_THE_BOX)
            box.fill("word " * 9000)  # past SmolLM2's 8,192-token context
            box.press("Enter")
            page.wait_for_function("() => window.boxHeld", timeout=60_000)
            page.get_by_text("maximum context length").first.wait_for(timeout=120_000)
            page.wait_for_function(BOX_FREE, timeout=60_000)
            kept, left = box.input_value(), page.locator("#chatbot .message").count()
            turns, _ = chat_in_the_browser(page, ["Say hi."])
            page.get_by_label("Model").click()
            page.get_by_role("option", name="gamma").click()
            page.get_by_text("A new conversation with gamma.").wait_for(timeout=30_000)
            browser.close()
    finally:
        live.stop()
        asyncio.run(hf_engine.unload_adapter("gamma"))
    assert kept == "word " * 9000  # the message stays to be shortened
    assert left == 0  # the failed turn is taken back
    assert len(turns) == 1 and turns[0] and "Error" not in turns[0]


def test_a_websocket_handshake_gets_the_apis_404_not_an_empty_403_with_the_ui_mounted(
    hf_engine, registry_for, tmp_path
):
    """Gradio's mount at / would take every handshake (Starlette's empty 403): the API's
    refusal sits in front of it."""
    from conftest import LiveServer
    from test_hostile_inputs import raw_exchange, websocket_library

    if not websocket_library():
        pytest.skip("uvicorn answers upgrades as plain HTTP")
    live = LiveServer(create_app(hf_engine, registry_for, tmp_path))
    try:
        for path in ("/v1/realtime", "/", "/gradio_api/queue/join"):
            handshake = (f"GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
                         "connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         "sec-websocket-version: 13\r\n\r\n")  # fmt: skip
            status, headers, body = raw_exchange(live.port, handshake.encode())
            assert status == 404 and headers["content-type"] == "application/json", body
            assert json.loads(body)["error"]["type"] == "not_found_error"
        assert httpx.get(live.url + "/", timeout=60).status_code == 200  # the UI still serves
    finally:
        live.stop()


def test_benchmarks_tab_shows_what_the_manifest_publishes_in_its_order(tmp_path):
    import gradio as gr

    from app import benchmarks_tab

    for name in ("sweep-a", "h200", "unlisted"):
        (tmp_path / name).mkdir()
    (tmp_path / "sweep-a" / "summary.md").write_text("| users | adapters |\n![x](x.png)")
    (tmp_path / "h200" / "targets.md").write_text("### Issue #6 targets")
    (tmp_path / "h200" / "soak.md").write_text("### Soak: 256 streams")
    (tmp_path / "unlisted" / "summary.md").write_text("left by a run, not published")
    (tmp_path / "published.yaml").write_text(
        "- {folder: h200, title: The H200 run, reports: [targets.md, soak.md]}\n"
        "- {folder: sweep-a, title: A sweep, reports: [summary.md]}\n"
    )
    with gr.Blocks() as demo:
        benchmarks_tab(tmp_path)
    sections = [b for b in demo.blocks.values() if isinstance(b, gr.Accordion)]
    assert [s.label for s in sections] == ["The H200 run", "A sweep"]
    assert [s.open for s in sections] == [True, True]  # the first OPEN_SECTIONS are open
    texts = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    assert [t.splitlines()[0] for t in texts] == ["`results/h200`", "`results/sweep-a`"]
    assert texts[0].index("Issue #6 targets") < texts[0].index("Soak: 256 streams")
    assert "![x]" not in texts[1]
    assert not any("left by a run" in t for t in texts)


def test_the_benchmarks_tab_folds_the_sections_after_the_first_few(tmp_path):
    import gradio as gr

    from app import OPEN_SECTIONS, benchmarks_tab

    entries = [f"- {{folder: run-{i}, title: Run {i}}}" for i in range(OPEN_SECTIONS + 2)]
    for i in range(OPEN_SECTIONS + 2):
        (tmp_path / f"run-{i}").mkdir()
    (tmp_path / "published.yaml").write_text("\n".join(entries))
    with gr.Blocks() as demo:
        benchmarks_tab(tmp_path)
    sections = [b for b in demo.blocks.values() if isinstance(b, gr.Accordion)]
    assert [s.open for s in sections] == [True] * OPEN_SECTIONS + [False, False]


def test_every_published_folder_report_and_plot_exists():
    from app import RESULTS, published

    entries = published()
    assert entries, "results/published.yaml lists nothing"
    for entry in entries:
        for name in [*entry.reports, *entry.plots]:
            assert (RESULTS / entry.folder / name).is_file(), f"{entry.folder}/{name}"


def test_python_app_py_serves_ui_and_api_as_the_readme_starts_it(tmp_path):
    out = tmp_path / "app_check.json"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "app_check.py"),
        "--backend",
        "hf",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["passed"] and report["api"]["backend"] == "hf"
    assert report["api"]["unknown_model_status"] == 404 and report["ui"]["compare_both_answered"]
