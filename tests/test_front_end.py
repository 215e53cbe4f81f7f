"""The HTTP front end under pressure: huge bodies do not stall other streams, a failing row
reaches only its own request, SIGTERM drains with a deadline, unload ends its streams after
its deadline, admin is off without a token, Gradio's upload route is capped. Real HTTP, real
uvicorn, the real SmolLM2 tokenizer and the CPU default where a model is needed.

No assertion depends on this machine's speed except the stall test's 1-second bound, which is
~50× the token gap it watches (the tokens come from a paced engine with no model)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from engine.api import create_api
from engine.backends.common import PromptTokenizer, fit_to_context
from loadtest.no_model import NoModelEngine

MIB = 1 << 20


class TokenizingNoModel(NoModelEngine):
    """The no-model engine, admitting requests as the real backends do: the SmolLM2 tokenizer,
    its chat template, the character pre-check and the context check."""

    def __init__(self, tokenizer, base_dir: str, adapters: list[str], gap_s: float):
        super().__init__("SmolLM2-135M-Instruct", adapters, gap_s)
        self.context = 8192
        self.prompt_tokenizer = PromptTokenizer(tokenizer, base_dir, True, self.context)

    async def stream(self, request):
        ids = await self.prompt_tokenizer(request)
        fit_to_context(len(ids), request, self.context)
        async for chunk in super().stream(request):
            yield chunk


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def serve(engine, registry, http: str = "auto", **kwargs):
    from conftest import LiveServer

    return LiveServer(create_api(engine, registry, **kwargs), http)


def stream_gaps(url: str, body: dict, started: threading.Event | None = None) -> dict:
    """Read one SSE stream; the largest gap between events, and how it ended. ``started`` is
    set once the first event arrived."""
    gaps, events, last = [], [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            events.append(line[6:])
            if started is not None:
                started.set()
    return {"max_gap": max(gaps, default=0.0), "events": events}


def streamed_text(events: list[str]) -> str:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def headers_only(port: int, size: int) -> int:
    """Announce a ``size``-byte body, send none of it, and read the status the server answers."""
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {size}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        return int(s.recv(4096).split(b" ")[1])


def test_huge_bodies_do_not_stall_other_streams_or_health(tokenizer, base_dir, registry_for):
    engine = TokenizingNoModel(tokenizer, base_dir, ["alpha"], gap_s=0.02)
    live = serve(engine, registry_for)
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 250,
        "stream": True,
    }
    long_prompt = {"model": "base", "messages": [{"role": "user", "content": "word " * 120_000}]}
    try:
        with ThreadPoolExecutor(24) as pool:
            watched = pool.submit(stream_gaps, live.url, body)
            time.sleep(0.5)
            door = [pool.submit(headers_only, live.port, 5 * MIB) for _ in range(8)]
            inside = [
                pool.submit(
                    httpx.post, f"{live.url}/v1/chat/completions", json=long_prompt, timeout=120
                )
                for _ in range(2)
            ]
            health = []
            for _ in range(5):
                t0 = time.perf_counter()
                assert httpx.get(f"{live.url}/health", timeout=30).status_code == 200
                health.append(time.perf_counter() - t0)
            statuses = [f.result() for f in door]
            answers = [f.result() for f in inside]
            stream = watched.result()
    finally:
        live.stop()
    assert statuses == [413] * 8  # refused by Content-Length, before any byte of the body
    for answer in answers:  # 600 KB: under the body limit, tokenized off the loop, too long
        assert answer.status_code == 400 and "context" in answer.json()["error"]["message"]
    assert stream["events"][-1] == "[DONE]" and len(stream["events"]) > 250
    assert stream["max_gap"] < 1.0, f"another stream stalled for {stream['max_gap']:.2f} s"
    assert max(health) < 1.0, f"/health took {max(health):.2f} s"


def test_a_failing_row_fails_only_its_own_request(hf_engine, registry_for, monkeypatch):
    """A row whose forward pass raises (here: any batch holding adapter beta) ends with an error
    for its own request; the base stream beside it goes on to the end, token for token as alone."""
    base = {
        "model": "base",
        "messages": [{"role": "user", "content": "Count to twenty."}],
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    live = serve(hf_engine, registry_for)
    try:
        alone = stream_gaps(live.url, base)["events"]
        forward = hf_engine.forward

        def poisoned(rows, *args, **kwargs):
            if any(row.request.adapter == "beta" for row in rows):
                raise RuntimeError("kernel failure on beta")
            return forward(rows, *args, **kwargs)

        monkeypatch.setattr(hf_engine, "forward", poisoned)
        with ThreadPoolExecutor(2) as pool:
            beside = pool.submit(stream_gaps, live.url, base)
            time.sleep(0.2)
            beta = {
                "model": "beta",
                "template_fields": {"context": "a", "question": "b"},
                "max_tokens": 20,
                "temperature": 0,
            }
            failed = httpx.post(f"{live.url}/v1/chat/completions", json=beta, timeout=120)
            events = beside.result()["events"]
        metrics = httpx.get(f"{live.url}/metrics").text
    finally:
        live.stop()
    assert failed.status_code == 500 and "kernel failure" in failed.json()["error"]["message"]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    assert streamed_text(events) == streamed_text(alone)
    assert 'status="500",type="server_error"' in metrics


def test_a_failing_choice_ends_its_whole_request_with_its_own_error_and_stops_the_others(
    hf_engine, registry_for, monkeypatch
):
    """Fan-out (not streamed) to the base and beta, beta's forward pass raising after its first
    tokens: the answer is beta's error (not a cleanup failure hiding it), and the base choice,
    mid-generation, stops."""
    forward, beta_passes = hf_engine.forward, []

    def poisoned(rows, *args, **kwargs):
        if any(row.request.adapter == "beta" for row in rows):
            beta_passes.append(len(rows))
            if len(beta_passes) > 3:
                raise RuntimeError("kernel failure on beta")
        return forward(rows, *args, **kwargs)

    body = {
        "model": "fanout",
        "models": ["base", "beta"],
        "prompt_template": "raw",
        "messages": [{"role": "user", "content": "Count on."}],
        "max_tokens": 4000,
        "ignore_eos": True,
    }
    live = serve(hf_engine, registry_for)
    try:
        monkeypatch.setattr(hf_engine, "forward", poisoned)
        failed = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120)
        monkeypatch.undo()
        for _ in range(600):  # the base row ends at once; 4000 tokens would take minutes
            if hf_engine.stats()["running"] == 0:
                break
            time.sleep(0.1)
        after = httpx.post(
            f"{live.url}/v1/chat/completions", json=body | {"max_tokens": 2}, timeout=120
        )
        metrics = httpx.get(f"{live.url}/metrics").text
    finally:
        live.stop()
    assert failed.status_code == 500, failed.text
    assert "kernel failure on beta" in failed.json()["error"]["message"]
    assert hf_engine.stats()["running"] == 0
    assert after.status_code == 200 and len(after.json()["choices"]) == 2
    assert 'finish="abort"' not in metrics  # the base choice was taken down, not left by a client


def test_a_step_failing_outside_its_rows_ends_them_and_the_worker_serves_on(hf_engine):
    """An error where no row can be blamed (merging a prefill into the batch) ends the rows in
    play with it; the worker thread lives on and the next request is answered."""
    from engine.backends import hf
    from engine.interface import EngineError, GenerationRequest, SamplingParams

    merge, calls = hf.merge_batches, []

    def out_of_memory(*args):
        calls.append(args)
        if len(calls) == 1:
            raise MemoryError("no room to merge")
        return merge(*args)

    request = GenerationRequest(prompt="Hi", params=SamplingParams(max_tokens=3))
    hf.merge_batches = out_of_memory
    try:
        with pytest.raises(EngineError, match="no room to merge"):
            asyncio.run(hf_engine.complete(request))
    finally:
        hf.merge_batches = merge
    assert hf_engine.worker.is_alive()
    done = asyncio.run(hf_engine.complete(GenerationRequest(prompt="Hi")))
    assert done.usage.completion_tokens > 0
    assert asyncio.run(hf_engine.health())["ok"] is True


def test_a_step_that_never_ends_makes_health_fail_and_serving_resumes_after_it(hf_engine):
    """A wedged worker (here: a step blocked on an event) is reported by /health once the step
    has run past the limit, instead of the engine looking busy and healthy forever."""
    import threading

    from engine.backends import hf
    from engine.interface import EngineError, GenerationRequest, SamplingParams

    release, entered, merge = threading.Event(), threading.Event(), hf.merge_batches

    def wedged(*args):
        entered.set()
        release.wait(60)
        return merge(*args)

    async def scenario():
        request = GenerationRequest(prompt="Hi", params=SamplingParams(max_tokens=2))
        answer = asyncio.ensure_future(hf_engine.complete(request))
        await asyncio.to_thread(entered.wait, 60)
        await asyncio.sleep(0.2)
        with pytest.raises(EngineError, match="one generation step has run for"):
            await hf_engine.health()
        release.set()
        assert (await answer).usage.completion_tokens > 0

    hf.merge_batches, limit, hf.STALLED_AFTER_S = wedged, hf.STALLED_AFTER_S, 0.1
    try:
        asyncio.run(scenario())
    finally:
        hf.merge_batches, hf.STALLED_AFTER_S = merge, limit
        release.set()
    assert asyncio.run(hf_engine.health())["ok"] is True


def test_an_abort_while_a_request_is_being_admitted_ends_it(hf_engine):
    """A constrained request compiles its grammar off the loop before joining the batch; an
    abort (drain or unload deadline) then ends it instead of being lost."""
    from engine.constraints import Constraint
    from engine.interface import GenerationRequest, RequestEndedError, SamplingParams

    async def scenario():
        params = SamplingParams(max_tokens=4, constraint=Constraint("regex", "(yes|no)"))
        request = GenerationRequest(prompt="Yes or no?", params=params)
        first = asyncio.ensure_future(anext(hf_engine.stream(request)))
        while request.request_id not in hf_engine.admitting:
            await asyncio.sleep(0)
        hf_engine.abort(request.request_id, "ended by the drain")
        with pytest.raises(RequestEndedError, match="drain"):
            await first
        assert not hf_engine.early_aborts and request.request_id not in hf_engine.rows

    asyncio.run(scenario())


def test_sigterm_refuses_new_requests_and_ends_streams_at_the_drain_deadline(
    tokenizer, base_dir, registry_for
):
    import uvicorn

    from engine.api.server import DrainingServer

    registry = registry_for.model_copy(deep=True)
    registry.server.drain_seconds = 1.0
    engine = TokenizingNoModel(tokenizer, base_dir, [], gap_s=0.05)
    app = create_api(engine, registry)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=3
    )
    server = DrainingServer(config, app.state.api)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2000,
        "stream": True,
    }
    streaming = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream_gaps, url, body, streaming)
        assert streaming.wait(120), "the stream never started"
        t0 = time.perf_counter()
        server.handle_exit(15, None)  # what uvicorn's SIGTERM handler calls
        events = running.result()["events"]
        ended = time.perf_counter() - t0
    thread.join(10)
    assert not thread.is_alive(), "the server did not exit after the drain"
    assert events[-1] == "[DONE]" and "shutting down" in events[-2]
    # the deadline (1 s), not the stream's own end (2000 tokens × 50 ms = 100 s)
    assert 0.8 < ended < 10.0, f"the stream ended {ended:.1f} s after SIGTERM (deadline 1 s)"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)


def test_unload_ends_its_streams_after_the_deadline_and_holds_the_name(
    hf_engine, registry_for, adapter_dirs, tmp_path
):
    import shutil

    shutil.copytree(adapter_dirs["alpha"], tmp_path / "delta")
    registry = registry_for.model_copy(deep=True)
    registry.server.unload_seconds = 1.0
    live = serve(hf_engine, registry, admin_token="t", adapter_root=tmp_path)
    auth = {"authorization": "Bearer t"}
    try:
        loaded = httpx.post(
            f"{live.url}/v1/adapters",
            json={"name": "delta", "path": "delta"},
            headers=auth,
            timeout=120,
        )
        assert loaded.status_code == 200, loaded.text
        body = {
            "model": "delta",
            "prompt_template": "raw",
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
            "messages": [{"role": "user", "content": "Go on."}],
        }
        streaming = threading.Event()
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(stream_gaps, live.url, body, streaming)
            assert streaming.wait(300), "the stream never started"
            unloading = pool.submit(
                httpx.delete, f"{live.url}/v1/adapters/delta", headers=auth, timeout=120
            )
            time.sleep(0.3)
            again = httpx.post(
                f"{live.url}/v1/adapters",
                json={"name": "delta", "path": "delta"},
                headers=auth,
                timeout=30,
            )
            used = httpx.post(
                f"{live.url}/v1/chat/completions",
                json=body | {"stream": False, "max_tokens": 2},
                timeout=30,
            )
            unloaded = unloading.result()
            events = running.result()["events"]
        metrics = httpx.get(f"{live.url}/metrics", timeout=30).text
    finally:
        live.stop()
    cut = [
        m
        for m in metrics.splitlines()
        if m.startswith('loraland_request_errors_total{adapter="delta"')
    ]
    assert len(cut) == 1 and cut[0].endswith(" 1.0")  # the failure after the 200, counted once
    assert again.status_code == 409 and "being unloaded" in again.json()["error"]["message"]
    assert used.status_code == 404
    assert unloaded.status_code == 200 and unloaded.json()["streams_ended"] == 1
    assert events[-1] == "[DONE]" and "unloaded" in events[-2]
    assert "delta" not in hf_engine.adapters()


@pytest.mark.parametrize("token", [None, ""])
def test_admin_routes_are_off_without_a_token(hf_engine, registry_for, token, tmp_path):
    live = serve(hf_engine, registry_for, admin_token=token, adapter_root=tmp_path)
    try:
        load = httpx.post(f"{live.url}/v1/adapters", json={"name": "x", "path": "x"})
        unload = httpx.delete(f"{live.url}/v1/adapters/alpha")
    finally:
        live.stop()
    for response in (load, unload):
        assert response.status_code == 403
        assert "LORALAND_ADMIN_TOKEN" in response.json()["error"]["message"]
    assert "alpha" in hf_engine.adapters()


def test_gradio_upload_route_is_capped_at_the_body_limit(hf_engine, registry_for, tmp_path):
    from conftest import LiveServer

    from app import create_app

    registry = registry_for.model_copy(deep=True)
    registry.server.max_body_bytes = 100_000
    live = LiveServer(create_app(hf_engine, registry, tmp_path))
    try:
        files = {"files": ("big.bin", b"x" * 2_000_000, "application/octet-stream")}
        upload = httpx.post(f"{live.url}/gradio_api/upload", files=files, timeout=60)
    finally:
        live.stop()
    assert upload.status_code == 413


def test_hot_loading_a_dora_adapter_is_refused_naming_why(hf_engine, base_dir, tmp_path):
    from helpers import make_peft_adapter

    from engine import AdapterLoadError

    dora = make_peft_adapter(
        base_dir, tmp_path / "dora", r=4, target_modules=["q_proj"], seed=5, use_dora=True
    )
    with pytest.raises(AdapterLoadError, match="DoRA"):
        asyncio.run(hf_engine.load_adapter("dora", dora))
    assert "dora" not in hf_engine.adapters()


def test_many_empty_messages_are_a_long_prompt_refused_untokenized(tokenizer, base_dir):
    """Each message costs its turn markers: 30,000 empty ones (under 1 MB of JSON) cannot fit
    8,192 tokens, and are refused before the tokenizer sees them (on the event loop)."""
    from engine.interface import GenerationRequest, PromptTooLongError

    tokenize = PromptTokenizer(tokenizer, base_dir, True, 8192)
    empty = GenerationRequest(messages=[{"role": "user", "content": ""}] * 30_000)
    with pytest.raises(PromptTooLongError, match="cannot fit") as refused:
        asyncio.run(tokenize(empty))
    assert refused.value.param == "messages" and refused.value.status_code == 400
    prompt = GenerationRequest(prompt="x" * (tokenize.limit + 1))
    with pytest.raises(PromptTooLongError, match="maximum context length") as refused:
        asyncio.run(tokenize(prompt))
    assert refused.value.param == "prompt"  # the field a completion sends
    assert tokenize.pool is None  # refused before any worker was started


def test_the_api_is_served_with_uvicorns_c_http_parser():
    """requirements/common.txt ships httptools, which uvicorn's "auto" (how ``run_server`` and the
    benchmarks serve) takes over the pure-Python h11: at 256 streams the API process spent about
    30 % less CPU per token (``results/serving/http-ttft-hops-cpu/parsers``)."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from engine.api.server import http_protocol

    config = Config(app=None)
    config.load()
    assert config.http == "auto" and config.http_protocol_class is HttpToolsProtocol
    assert issubclass(http_protocol(), HttpToolsProtocol)  # what run_server serves with


def test_the_pure_python_parser_too_answers_unparsable_bytes_in_openai_shape(registry_for):
    """Without httptools uvicorn falls back to h11; its 400 for bytes that are not HTTP is
    OpenAI-shaped JSON as well, and the server serves on."""
    from test_hostile_inputs import raw_exchange

    live = serve(NoModelEngine("base", ["alpha"], gap_s=0), registry_for, http="h11")
    try:
        status, headers, body = raw_exchange(live.port, b"GARBAGE\r\n\r\n")
        assert status == 400 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        answer = httpx.post(f"{live.url}/v1/chat/completions", json=chat, timeout=60)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    finally:
        live.stop()


@pytest.mark.parametrize("http, status", [("auto", 431), ("h11", 400)])
def test_a_head_over_the_limit_is_refused_in_openai_shape_and_serving_goes_on(
    registry_for, http, status
):
    """httptools (what ``auto`` takes) read 50 MB of headers into memory: 64 KB at most now, a
    431. h11 stops an incomplete head at 16 KB by itself (a 400). The next requests on a
    kept-alive connection, each with a large head and body, are served."""
    import select
    import socket

    from test_hostile_inputs import read_answer

    from engine.api.server import MAX_HEAD_BYTES

    live = serve(NoModelEngine("base", ["alpha"], gap_s=0), registry_for, http=http)
    limit = MAX_HEAD_BYTES if http == "auto" else 16 * 1024  # h11's own
    try:
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
            sent = s.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            while sent <= limit:  # a read at a time, as a slow client, and not a byte past it
                s.sendall(b"a" * 8192)
                sent += 8192
                if select.select([s], [], [], 0.2)[0]:  # answered already
                    break
            code, headers, body = read_answer(s)
        assert code == status and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        with httpx.Client(base_url=live.url, timeout=60) as client:  # one connection, kept alive
            chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi " * 20_000}]}
            for _ in range(3):
                fill = {"X-Fill": "b" * 12_000}  # under both limits, each time again
                assert (
                    client.post("/v1/chat/completions", json=chat, headers=fill).status_code == 200
                )
    finally:
        live.stop()


def test_a_head_over_the_limit_in_one_write_is_refused_too(registry_for):
    """A complete head over 64 KB sent at once (found by a hostile-input pass: it was served),
    and one just under it on the same server, which is served."""
    import socket

    from test_hostile_inputs import read_answer

    from engine.api.server import MAX_HEAD_BYTES

    live = serve(NoModelEngine("base", ["alpha"], gap_s=0), registry_for)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n"
    try:
        for size, expected in ((MAX_HEAD_BYTES + 6_000, 431), (MAX_HEAD_BYTES - 1_000, 200)):
            with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
                s.sendall(head % (b"a" * (size - len(head))))
                code, headers, body = read_answer(s)
            assert code == expected and headers["content-type"] == "application/json"
            if expected == 431:
                assert "larger than" in json.loads(body)["error"]["message"]
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
            # pipelined: a body of 62,000 bytes and, in its last read, the next head's start
            s.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 62000\r\n\r\n")
            time.sleep(0.2)
            s.sendall(b"b" * 62_000 + b"GET /health HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.2)
            s.sendall(b"X-Pad: " + b"a" * 5_000 + b"\r\nConnection: close\r\n\r\n")
            answers = b""
            while chunk := s.recv(65536):
                answers += chunk
        assert re.findall(rb"HTTP/1.1 (\d{3})", answers) == [b"404", b"200"]  # no false 431
    finally:
        live.stop()


@pytest.mark.parametrize("http", ["auto", "h11"])
def test_an_offer_of_http2_is_ignored_and_the_request_served_with_its_body(registry_for, http):
    """``curl --http2`` on a plain-text URL adds ``Upgrade: h2c``: httptools stopped at that
    head and the app saw no body (found by a hostile-input pass: a 400 "not valid JSON")."""
    import socket

    from test_hostile_inputs import read_answer

    live = serve(NoModelEngine("base", ["alpha"], gap_s=0), registry_for, http=http)
    body = json.dumps({"model": "base", "prompt": "Hi", "max_tokens": 2}).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    try:
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
            s.sendall(head.encode() + body)
            code, _, answer = read_answer(s)
        assert code == 200, answer
        assert json.loads(answer)["choices"][0]["text"]
    finally:
        live.stop()


def test_a_body_that_looks_like_an_http2_offer_is_passed_on_whole(registry_for):
    """A head whose blank line comes in the next read: that read's first blank line is in the
    body, and an ``Upgrade: h2c`` line before it is the body's, not to be taken out (a review
    found it taken out: the next pipelined request was then read as the body's rest)."""
    import socket

    live = serve(NoModelEngine("base", ["alpha"], gap_s=0), registry_for)
    body = b"X\r\nUpgrade:" + b" " * 20 + b"h2c\r\n\r\n"
    head = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body)
    try:
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
            s.sendall(head)
            time.sleep(0.3)
            s.sendall(
                b"\r\n" + body + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            answers = b""
            while chunk := s.recv(65536):
                answers += chunk
        assert re.findall(rb"HTTP/1.1 (\d{3})", answers) == [b"404", b"200"], answers[:300]
    finally:
        live.stop()


def test_a_head_sent_too_slowly_is_a_408_and_serving_goes_on(registry_for, monkeypatch):
    import socket

    from test_hostile_inputs import read_answer

    import engine.api.server

    monkeypatch.setattr(engine.api.server, "HEAD_SECONDS", 0.5)
    live = serve(NoModelEngine("base", ["alpha"], gap_s=0), registry_for)
    try:
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")  # and nothing more
            code, headers, body = read_answer(s)
        assert code == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
            code, headers, _ = read_answer(s)  # a connection that sends nothing at all
        assert code == 408 and headers["connection"] == "close"
        assert httpx.get(f"{live.url}/health", timeout=30).status_code == 200
    finally:
        live.stop()


def test_a_body_sent_too_slowly_is_a_408_and_serving_goes_on(registry_for, monkeypatch):
    """A client that sends its head and then its body a byte at a time held a connection (and
    its request's task) for as long as it liked; the others' requests go on meanwhile."""
    import socket

    from test_hostile_inputs import read_answer

    import engine.api.server

    monkeypatch.setattr(engine.api.server, "BODY_SECONDS", 1.0)
    live = serve(NoModelEngine("base", ["alpha"], gap_s=0), registry_for)
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    try:
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            s.sendall(head + b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{")
            answer = httpx.post(f"{live.url}/v1/chat/completions", json=chat, timeout=60)
            assert answer.status_code == 200  # served while the slow body waits
            code, headers, body = read_answer(s)
        assert code == 408 and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error" and "body" in error["message"]
        assert httpx.get(f"{live.url}/health", timeout=30).status_code == 200
    finally:
        live.stop()


def test_cors_is_off_by_default_and_answers_the_origins_listed(registry_for):
    """A page from elsewhere reads nothing by default; with ``server.cors_origins`` a browser's
    preflight is answered and the answers carry the origin (streamed ones too)."""
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"}  # fmt: skip
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    opened = registry_for.model_copy(deep=True)
    opened.server.cors_origins = ["http://ui.example"]
    for registry, allowed in ((registry_for, None), (opened, "http://ui.example")):
        live = serve(NoModelEngine("base", ["alpha"], gap_s=0), registry)
        try:
            options = httpx.options(f"{live.url}/v1/chat/completions", headers=preflight)
            origin = {"Origin": "http://ui.example"}
            answer = httpx.post(f"{live.url}/v1/chat/completions", json=chat, headers=origin)
            streamed = httpx.post(
                f"{live.url}/v1/chat/completions", json={**chat, "stream": True}, headers=origin
            )
            other = httpx.get(f"{live.url}/v1/models", headers={"Origin": "http://evil.example"})
        finally:
            live.stop()
        assert answer.status_code == streamed.status_code == 200
        assert answer.headers.get("access-control-allow-origin") == allowed
        assert streamed.headers.get("access-control-allow-origin") == allowed
        assert "access-control-allow-origin" not in other.headers
        if allowed:
            assert options.status_code == 200
            assert "POST" in options.headers["access-control-allow-methods"]
        else:
            assert "access-control-allow-origin" not in options.headers


def test_a_pipelined_body_the_server_is_not_reading_yet_is_not_timed_out(registry_for, monkeypatch):
    """Behind a stream longer than ``BODY_SECONDS``, a pipelined request's large body waits
    for the server to read it: no 408 may land in the middle of the stream."""
    import socket

    import engine.api.server

    monkeypatch.setattr(engine.api.server, "BODY_SECONDS", 1.0)
    live = serve(NoModelEngine("base", ["alpha"], gap_s=0.05), registry_for)

    def request(body: dict) -> bytes:
        data = json.dumps(body).encode()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        return head + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data

    hi = [{"role": "user", "content": "Hi"}]
    long = request({"model": "base", "messages": hi, "max_tokens": 60, "stream": True})
    second = request({"model": "base", "messages": [{"role": "user", "content": "x" * 300_000}],
                      "max_tokens": 2})  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", live.port), timeout=60) as s:
            s.sendall(long + second[:-5])
            time.sleep(0.3)
            s.sendall(second[-5:])  # all sent promptly; the server reads it after the stream
            data = b""
            while data.count(b"HTTP/1.1 ") < 2 or not data.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                assert chunk, "the connection closed early"
                data += chunk
    finally:
        live.stop()
    assert b"HTTP/1.1 408" not in data and b"data: [DONE]" in data
    assert data.count(b"HTTP/1.1 200") == 2


def test_head_on_the_read_only_routes_answers_as_get_without_a_body(registry_for):
    live = serve(NoModelEngine("base", ["alpha"], gap_s=0), registry_for)
    try:
        heads = {p: httpx.head(f"{live.url}{p}") for p in ("/health", "/v1/models", "/metrics")}
        heads["/v1/models/alpha"] = httpx.head(f"{live.url}/v1/models/alpha")
        gets = {p: httpx.get(f"{live.url}{p}") for p in heads}
        generation = httpx.head(f"{live.url}/v1/chat/completions")
    finally:
        live.stop()
    for path, head in heads.items():
        assert head.status_code == gets[path].status_code == 200, path
        assert (
            head.content == b""
            and head.headers["content-type"] == gets[path].headers["content-type"]
        )
    assert generation.status_code == 405 and "POST" in generation.headers["allow"]


def test_a_fitted_default_max_tokens_is_the_requests_own():
    """Requests may share one ``SamplingParams`` (the evaluator's, a batch's): fitting one long
    prompt's default ``max_tokens`` leaves the others' as they were."""
    from engine.backends.common import fit_to_context
    from engine.interface import GenerationRequest
    from engine.sampling import resolve

    shared = resolve(None)
    long, short = (GenerationRequest(prompt="x", params=shared) for _ in range(2))
    fit_to_context(8190, long, 8192)
    fit_to_context(10, short, 8192)
    assert long.params.max_tokens == 2 and short.params is shared and shared.max_tokens == 256


@pytest.mark.parametrize(
    "request_fields, param",
    [({"prompt_ids": [1, 2]}, "prompt"), ({"prompt": "x"}, "prompt"),
     ({"messages": [{"role": "user", "content": "x"}]}, "messages")],
)  # fmt: skip
def test_a_default_max_tokens_is_fitted_down_to_min_tokens_and_no_further(request_fields, param):
    """Room for ``min_tokens`` (or the engine's ``reserved`` tokens) is the floor: below it,
    the 400 names the field that holds the prompt (token ids are a ``prompt``)."""
    from engine.backends.common import fit_to_context
    from engine.interface import GenerationRequest, PromptTooLongError
    from engine.sampling import resolve

    def request(**sampling):
        return GenerationRequest(params=resolve(None, **sampling), **request_fields)

    fitted = request(min_tokens=5)
    fit_to_context(8187, fitted, 8192)
    assert fitted.params.max_tokens == 5
    reserved = request()
    fit_to_context(8180, reserved, 8192, reserved=2)
    assert reserved.params.max_tokens == 10
    for prompt_tokens, sampling in ((8188, {"min_tokens": 5}), (8192, {})):
        with pytest.raises(PromptTooLongError, match="leaves") as refused:
            fit_to_context(prompt_tokens, request(**sampling), 8192)
        assert refused.value.param == param
    explicit = request(max_tokens=13)
    with pytest.raises(PromptTooLongError, match="you requested 8193") as refused:
        fit_to_context(8180, explicit, 8192)
    assert refused.value.param == "max_tokens"
    fit_to_context(8180, request(max_tokens=12), 8192, reserved=2)  # explicit: the context's
    with pytest.raises(PromptTooLongError, match="less 2 this engine keeps back, 0"):
        fit_to_context(8190, request(), 8192, reserved=2)
    for sampling in ({}, {"max_tokens": 1}):  # SGLang aborts past its longest prompt: a 400
        with pytest.raises(PromptTooLongError, match="takes at most 8185") as refused:
            fit_to_context(8186, request(**sampling), 8192, reserved=2, longest_prompt=8185)
        assert refused.value.param == param
