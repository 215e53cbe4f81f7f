"""``LORALAND_API_KEY``: every ``/v1`` route asks for it (the plain-ASGI generation routes too),
and ``/metrics`` unless ``server.open_metrics``, over real HTTP on the CPU backend; ``/health``
and the UI stay open, ``/health`` naming nothing without the key; the admin token stays its
own; the clients in the product send the key."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine.api import create_api
from engine.api.hot_path import GenerationRoutes
from engine.api.limits import KEYED_ROOT_PATHS, ApiKey

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"
TOKEN = "admin-s3cret"
BASE = "SmolLM2-135M-Instruct"
REFUSAL = {"type": "invalid_request_error", "param": None, "code": 401}
OPEN_ROUTES = {
    *("/health", "/get_model_info", "/model_info", "/get_server_info", "/server_info"),
    *("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"),
}
"""Every route outside ``/v1``: a new one must be added here, on purpose."""
CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
KEYED = {"Authorization": f"Bearer {KEY}"}


def serve(app):
    from conftest import LiveServer

    return LiveServer(app)


@pytest.fixture(scope="module")
def server(hf_engine, registry_for, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_root")
    app = create_api(hf_engine, registry_for, admin_token=TOKEN, adapter_root=root, api_key=KEY)
    live = serve(app)
    live.app = app
    yield live
    live.stop()


def refusal_message(response: httpx.Response) -> str:
    """The message of the key's 401, after checking it has OpenAI's shape."""
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert set(error) == {"message", *REFUSAL}
    assert {k: error[k] for k in REFUSAL} == REFUSAL
    return error["message"]


def test_no_key_or_a_wrong_one_is_a_401_in_openai_shape(server):
    url = f"{server.url}/v1/chat/completions"
    missing = httpx.post(url, json=CHAT, timeout=60)
    assert "didn't provide an API key" in refusal_message(missing)
    for wrong in (f"Bearer {KEY}x", "Bearer", KEY, f"Basic {KEY}", f"Bearer {KEY[:-1]}"):
        answer = httpx.post(url, json=CHAT, headers={"Authorization": wrong}, timeout=60)
        assert refusal_message(answer).startswith("Incorrect API key provided")


def test_the_scheme_in_any_case_and_spaces_around_are_read_as_rfc_7235_says(server):
    url = f"{server.url}/v1/models"
    for given in (f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}"):
        assert httpx.get(url, headers={"Authorization": given}, timeout=60).status_code == 200
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as raw:  # httpx refuses to send
        raw.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY} \t\r\n"
                    "Connection: close\r\n\r\n".encode())  # fmt: skip
        assert raw.recv(64).startswith(b"HTTP/1.1 200")


def served(app, *calls) -> list[httpx.Response]:
    """Each ``call(url)``'s answer from ``app`` served over real HTTP for the calls."""
    live = serve(app)
    try:
        return [call(live.url) for call in calls]
    finally:
        live.stop()


def test_a_key_read_with_a_newline_is_the_key_without_it(hf_engine, registry_for):
    keyed, missing = served(
        create_api(hf_engine, registry_for, api_key=f" {KEY}\n"),
        lambda url: httpx.get(f"{url}/v1/models", headers=KEYED, timeout=60),
        lambda url: httpx.get(f"{url}/v1/models", timeout=60),
    )
    assert keyed.status_code == 200 and missing.status_code == 401


@pytest.mark.parametrize("root_path", ["/", "/v", "/api"])
def test_no_root_path_lets_a_v1_route_through(server, root_path):
    """A ``root_path`` that is not a whole segment of the path is not stripped (Starlette's
    router reads it so): ``/v1/models`` under ``root_path="/"`` is still ``/v1/models``."""
    transport = httpx.ASGITransport(app=server.app, root_path=root_path)

    async def get(path):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    for path in ("/v1/models", f"{root_path.rstrip('/')}/v1/models"):
        assert asyncio.run(get(path)).status_code == 401, (root_path, path)


def test_the_openai_sdk_with_the_key_streamed_and_not(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name a fruit."}]
    whole = client.chat.completions.create(
        model="alpha", messages=messages, max_tokens=6, temperature=0
    )
    stream = client.chat.completions.create(
        model="alpha", messages=messages, max_tokens=6, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
    completion = client.completions.create(model=BASE, prompt="Hello", max_tokens=3)
    assert completion.usage.completion_tokens >= 1
    assert {"alpha", "beta", BASE} <= {model.id for model in client.models.list()}
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        stranger.chat.completions.create(model="alpha", messages=messages, max_tokens=2)
    assert refused.value.status_code == 401


def test_health_names_nothing_without_the_key_and_metrics_count_the_refusals(server):
    httpx.get(f"{server.url}/v1/models", timeout=60)
    brief = httpx.get(f"{server.url}/health", timeout=60)
    assert brief.status_code == 200 and brief.json() == {"ok": True}
    wrong = httpx.get(f"{server.url}/health", headers={"Authorization": "Bearer no"}, timeout=60)
    assert wrong.json() == {"ok": True}
    full = httpx.get(f"{server.url}/health", headers=KEYED, timeout=60).json()
    assert full["ok"] is True and {"alpha", "beta"} <= set(full["adapters"])
    refusal_message(httpx.get(f"{server.url}/metrics", timeout=60))
    assert httpx.head(f"{server.url}/metrics", timeout=60).status_code == 401
    assert httpx.head(f"{server.url}/metrics", headers=KEYED, timeout=60).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", headers=KEYED, timeout=60).text.splitlines()
    assert 'adapter="alpha"' not in httpx.get(f"{server.url}/metrics", timeout=60).text
    refused = [m for m in metrics if m.startswith("loraland_request_errors_total{")
               and 'adapter="none"' in m and 'status="401"' in m]  # fmt: skip
    assert refused and float(refused[0].rsplit(" ", 1)[1]) >= 1


def handshake(path: str, headers: dict[str, str]) -> bytes:
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (f"GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            f"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n"
            f"{fields}\r\n").encode()  # fmt: skip


def test_a_websocket_handshake_without_the_key_is_a_401_before_the_404(server):
    from test_hostile_inputs import raw_exchange, websocket_library

    if not websocket_library():
        pytest.skip("uvicorn answers upgrades as plain HTTP")
    path = "/v1/realtime?model=gpt-realtime"  # the OpenAI SDK's Realtime client
    for headers in ({}, {"Authorization": "Bearer no"}):
        status, _, body = raw_exchange(server.port, handshake(path, headers))
        assert status == 401, body
        error = json.loads(body)["error"]
        assert {k: error[k] for k in REFUSAL} == REFUSAL and "API key" in error["message"]
    status, _, body = raw_exchange(server.port, handshake(path, KEYED))
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error", body


def test_the_control_api_answers_a_websocket_handshake_as_a_replica_does(server):
    from test_hostile_inputs import raw_exchange, websocket_library

    from engine.cluster import create_control

    if not websocket_library():
        pytest.skip("uvicorn answers upgrades as plain HTTP")
    live = serve(create_control([server.url], "http://127.0.0.1:9", TOKEN, api_key=KEY))
    try:
        refused = raw_exchange(live.port, handshake("/v1/realtime", {}))
        keyed = raw_exchange(live.port, handshake("/v1/realtime", KEYED))
    finally:
        live.stop()
    assert refused[0] == 401 and json.loads(refused[2])["error"]["code"] == 401, refused
    assert keyed[0] == 404 and json.loads(keyed[2])["error"]["type"] == "not_found_error", keyed


def v1_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every ``/v1`` route of ``app``: FastAPI's (path parameters filled, HEAD
    beside GET) and the plain-ASGI ones ``GenerationRoutes`` answers before FastAPI."""
    routes = set()
    for route in app.routes:
        path = getattr(route, "path", "")
        if path == "/v1" or path.startswith("/v1/") or path in KEYED_ROOT_PATHS:
            methods = set(getattr(route, "methods", None) or {"GET"})
            methods |= {"HEAD"} if "GET" in methods else set()
            routes |= {(method, re.sub(r"\{[^}]*\}", "x", path)) for method in methods}
    plain = [m.kwargs["routes"] for m in app.user_middleware if m.cls is GenerationRoutes]
    assert plain, "the generation routes are no longer plain ASGI: update this test"
    return routes | {("POST", path) for path in plain[0]}


def outside_v1(app) -> set[str]:
    paths = {getattr(route, "path", "") for route in app.routes}
    return {p for p in paths if p != "/v1" and not p.startswith("/v1/")} - set(KEYED_ROOT_PATHS)


def assert_refused(client: httpx.Client, method: str, path: str, headers: dict) -> None:
    answer = client.request(method, path, json={}, headers=headers)
    if method == "HEAD":  # no body
        assert answer.status_code == 401, (method, path)
    else:
        refusal_message(answer)


def test_every_v1_route_refuses_without_the_key(server):
    routes = v1_routes(server.app)
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
            ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/x"), ("POST", "/tokenize"),
            ("POST", "/v1/detokenize")} <= routes  # fmt: skip
    assert outside_v1(server.app) <= OPEN_ROUTES
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for method, path in sorted(routes):
            assert_refused(client, method, path, {})
            assert_refused(client, method, path, {"Authorization": "Bearer wrong"})
        for path in outside_v1(server.app) - {"/health"}:  # /health: the test above
            assert client.get(path).status_code == 200, path


def test_open_metrics_leaves_only_the_metrics_open(hf_engine, registry_for):
    registry = registry_for.model_copy(deep=True)
    registry.server.open_metrics = True
    live = serve(create_api(hf_engine, registry, api_key=KEY))
    try:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            metrics = client.get("/metrics")
            refusal_message(client.get("/v1/models"))
            refusal_message(client.post("/tokenize", json={"prompt": "Hi"}))
            health = client.get("/health").json()
    finally:
        live.stop()
    assert metrics.status_code == 200 and "loraland_requests_total" in metrics.text
    assert health == {"ok": True}


def test_mounted_under_a_prefix_health_and_open_metrics_behave_the_same(hf_engine, registry_for):
    from fastapi import FastAPI

    registry = registry_for.model_copy(deep=True)
    registry.server.open_metrics = True
    parent = FastAPI()
    parent.mount("/api", create_api(hf_engine, registry, api_key=KEY))
    live = serve(parent)
    try:
        with httpx.Client(base_url=f"{live.url}/api", timeout=60) as client:
            brief = client.get("/health").json()
            full = client.get("/health", headers=KEYED).json()
            metrics = client.get("/metrics")
            refusal_message(client.get("/v1/models"))
    finally:
        live.stop()
    assert brief == {"ok": True} and "alpha" in full["adapters"]
    assert metrics.status_code == 200


def test_the_admin_token_stays_its_own(server, hf_engine, registry_for):
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        as_user = client.delete("/v1/adapters/alpha", headers=KEYED)
        assert as_user.status_code == 401
        assert as_user.json()["error"]["type"] == "authentication_error"  # admin token required
        as_admin = client.delete("/v1/adapters/no-such", headers=admin)  # passes both checks
        assert as_admin.status_code == 404
    assert "alpha" in hf_engine.adapters()
    live = serve(create_api(hf_engine, registry_for, api_key=KEY))  # a key, no admin token
    try:
        off = httpx.post(
            f"{live.url}/v1/adapters", json={"name": "x", "path": "x"}, headers=KEYED, timeout=60
        )
    finally:
        live.stop()
    assert off.status_code == 403 and "LORALAND_ADMIN_TOKEN" in off.json()["error"]["message"]


@pytest.mark.parametrize("key", [None, ""])
def test_without_a_key_nothing_is_asked_or_added(hf_engine, registry_for, key):
    app = create_api(hf_engine, registry_for, api_key=key)
    assert not [m for m in app.user_middleware if m.cls is ApiKey]  # not even a check per request
    answer, listing = served(
        app,
        lambda url: httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60),
        lambda url: httpx.get(f"{url}/v1/models", timeout=60),
    )
    assert answer.status_code == 200 and listing.status_code == 200


def test_a_cors_preflight_needs_no_key_and_the_refusal_is_readable(hf_engine, registry_for):
    opened = registry_for.model_copy(deep=True)
    opened.server.cors_origins = ["http://ui.example"]
    origin = {"Origin": "http://ui.example"}
    asks = "authorization, content-type"
    preflight = origin | {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": asks,
    }
    live = serve(create_api(hf_engine, opened, api_key=KEY))
    try:
        options = httpx.options(f"{live.url}/v1/chat/completions", headers=preflight)
        refused = httpx.post(
            f"{live.url}/v1/chat/completions", json=CHAT, headers=origin, timeout=60
        )
        served = httpx.post(
            f"{live.url}/v1/chat/completions", json=CHAT, headers=origin | KEYED, timeout=60
        )
    finally:
        live.stop()
    assert options.status_code == 200
    assert "authorization" in options.headers["access-control-allow-headers"].lower()
    refusal_message(refused)
    assert refused.headers["access-control-allow-origin"] == "http://ui.example"
    assert served.status_code == 200


def test_the_app_asks_for_the_key_on_v1_only(hf_engine, registry_for, tmp_path, monkeypatch):
    from app import create_app

    monkeypatch.setenv("LORALAND_API_KEY", KEY)
    app = create_app(hf_engine, registry_for, tmp_path)
    assert v1_routes(app) >= {("POST", "/v1/chat/completions"), ("POST", "/v1/adapters/merge")}
    live = serve(app)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            for method, path in sorted(v1_routes(app)):
                assert_refused(client, method, path, {})
            listing = client.get("/v1/models", headers=KEYED)
            ui = client.get("/")
            health = client.get("/health")
    finally:
        live.stop()
    assert listing.status_code == ui.status_code == health.status_code == 200


def test_the_remote_engine_sends_the_key(server, registry_for):
    from engine.interface import GenerationRequest, collect
    from engine.remote import AdminRefusedError, RemoteEngine, RemoteError
    from engine.sampling import resolve

    with pytest.raises(RemoteError, match="401"):
        RemoteEngine(server.url, registry_for, admin_token=TOKEN)
    remote = RemoteEngine(server.url, registry_for, admin_token=TOKEN, api_key=KEY)
    assert {"alpha", "beta"} <= set(remote.adapters())
    messages = [{"role": "user", "content": "Name a fruit."}]
    request = GenerationRequest(None, messages=messages, params=resolve(None, max_tokens=3))
    done = asyncio.run(collect(remote.stream(request), request))
    assert done.usage.completion_tokens >= 1
    ids, _ = asyncio.run(remote.tokenize(request))
    assert len(ids) == done.usage.prompt_tokens
    with pytest.raises(AdminRefusedError) as refused:  # the admin token passed both checks
        asyncio.run(remote.load_adapter("gamma", "no-such-folder"))
    assert refused.value.status_code not in (401, 403)


def test_the_control_api_asks_for_the_key_and_sends_it_to_the_replicas(server):
    from fastapi.testclient import TestClient

    from engine.cluster import create_control

    control = create_control([server.url], "http://127.0.0.1:9", TOKEN, api_key=KEY)
    with TestClient(control) as client:
        refusal_message(client.get("/v1/models"))
        listed = client.get("/v1/models", headers=KEYED)
        unload = client.delete("/v1/adapters/no-such", headers={"Authorization": f"Bearer {TOKEN}"})
        health = client.get("/health")
        full_health = client.get("/health", headers=KEYED)
        refusal_message(client.get("/metrics"))
        metrics = client.get("/metrics", headers=KEYED)
        refusal_message(client.post("/tokenize", json={"prompt": "Hi"}))
        tokenized = client.post("/tokenize", json={"prompt": "Hi"}, headers=KEYED)
    assert tokenized.status_code == 200 and tokenized.json()["count"] >= 1
    assert listed.status_code == 200 and "alpha" in {c["id"] for c in listed.json()["data"]}
    assert unload.status_code == 404  # the replica's answer: the admin token passed its checks
    assert health.status_code == 200 and health.json() == {"ok": True}
    assert "alpha" in full_health.json()["replicas"][0]["adapters"]
    assert metrics.status_code == 200 and 'adapter="alpha"' in metrics.text
    open_control = create_control(
        [server.url], "http://127.0.0.1:9", api_key=KEY, open_metrics=True
    )
    with TestClient(open_control) as client:
        assert 'adapter="alpha"' in client.get("/metrics").text
        refusal_message(client.get("/v1/models"))


def free_router_port() -> int:
    """P with P (the router) and P + 2 (its metrics) free, from 18700-18797."""
    for _ in range(100):
        port = random.randrange(18700, 18798)
        if all(port_is_free(port + k) for k in (0, 2)):
            return port
    raise RuntimeError("no free ports")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_sglang_router_passes_the_key_on_to_a_replica(server):
    """The router has no key of its own (``engine.cluster`` gives it none): it passes the
    client's ``Authorization`` on, and the replica's 401 comes back."""
    pytest.importorskip("sglang_router", reason="sglang-router is in requirements/dev.txt")
    import openai

    from engine.cluster import router_command, start, stop_all, wait_until_up

    port = free_router_port()
    router = start(router_command([server.url], "127.0.0.1", port, "round_robin"))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/readiness", router, 120)
        refused = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        answer = client.chat.completions.create(**CHAT)
        stored = httpx.post(f"{url}/v1/conversations", json={"items": []}, timeout=60)
        items = httpx.get(
            f"{url}/v1/conversations/{stored.json().get('id', 'x')}/items", timeout=60
        )
    finally:
        stop_all([router])
    assert refused.status_code == 401 and refused.json()["error"]["code"] == 401
    assert answer.choices[0].message.content
    assert (
        items.status_code == 404
    )  # no conversation store of the router's own (it answers unkeyed)


def test_the_locust_user_sends_the_key(server, tmp_path):
    raw = tmp_path / "raw.jsonl"
    cmd = [sys.executable, "-m", "locust", "-f", "loadtest/", "--headless", "-u", "1", "-r", "1",
           "-t", "3s", "--host", server.url, "--prompt-words", "3", "--output-tokens", "2",
           "--raw-out", str(raw), "--stop-timeout", "20", "--only-summary"]  # fmt: skip
    env = dict(os.environ, LORALAND_API_KEY=KEY)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    assert records and all(r["ok"] for r in records)


def test_the_peer_routing_check_sends_the_key(server, monkeypatch):
    from loadtest.peer import check_routing

    monkeypatch.setenv("LORALAND_API_KEY", KEY)
    seen = check_routing(server.url, "{adapter}")
    assert seen["known_status"] == 200 and seen["unknown_status"] == 404
