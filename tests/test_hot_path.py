"""The generation routes' plain-ASGI path (engine/api/hot_path.py): a streamed answer ends when
its client leaves and only then, and other requests reach the FastAPI app as before. The live
server's side (a disconnect aborting the generation, every error shape) is in test_api.py and
test_hostile_inputs.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from engine.api.hot_path import CancelOnDisconnect, EventStream, GenerationRoutes, route_path

ROOT = Path(__file__).resolve().parents[1]


class Client:
    """An ASGI client: ``leave`` makes ``receive`` answer ``http.disconnect``."""

    def __init__(self):
        self.sent, self.left = [], asyncio.Event()

    async def receive(self):
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


def events(n: int, closed: list, pause: asyncio.Event | None = None):
    async def gen():
        try:
            for i in range(n):
                if pause is not None and i == 2:
                    await pause.wait()
                yield b"data: %d\n\n" % i
        finally:
            closed.append(True)

    return gen()


async def stalled_stream() -> tuple[Client, list, asyncio.Task]:
    """A stream that has sent two events and waits for a third that never comes: its client,
    the generator's closed flag and the task answering."""
    client, closed = Client(), []
    stream = EventStream(events(5, closed, asyncio.Event()))
    answer = asyncio.ensure_future(stream({}, client.receive, client.send))
    await asyncio.sleep(0.01)
    return client, closed, answer


def test_a_stream_sends_every_event_then_ends_and_leaves_its_task_alone():
    async def main():
        client, closed = Client(), []
        await EventStream(events(3, closed))({}, client.receive, client.send)
        for _ in range(5):  # a watcher finishing late must not cancel the task that called it
            await asyncio.sleep(0)
        client.left.set()
        await asyncio.sleep(0.01)
        return client, closed

    client, closed = asyncio.run(main())
    assert client.sent[0]["headers"] == [(b"content-type", b"text/event-stream; charset=utf-8")]
    assert client.bodies() == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    assert client.sent[-1]["more_body"] is False and closed == [True]


def test_a_client_that_leaves_ends_the_stream_and_closes_its_generator():
    async def main():
        client, closed, answer = await stalled_stream()
        client.left.set()
        await asyncio.wait_for(answer, 5)  # returns: the client's leaving is not an error
        return client, closed, answer

    client, closed, answer = asyncio.run(main())
    assert client.bodies() == [b"data: 0\n\n", b"data: 1\n\n"]  # no end of body: nobody to read it
    assert closed == [True] and not answer.cancelled()


def test_a_stream_cancelled_from_outside_stays_cancelled():
    async def main():
        _, closed, answer = await stalled_stream()
        answer.cancel()  # e.g. the server stopping
        with pytest.raises(asyncio.CancelledError):
            await answer
        return closed

    assert asyncio.run(main()) == [True]


def test_one_watch_serves_a_requests_blocks_and_a_client_gone_between_them_ends_the_stream():
    """The request's first-token block and its stream share one watcher task; a client that
    left in between ends the stream at its first wait, its generator closed, its body never
    finished."""

    async def main():
        client, closed, first = Client(), [], asyncio.Event()
        watch = CancelOnDisconnect(client.receive)
        async with watch:
            await asyncio.sleep(0)  # the first token came
        watcher = watch.watcher
        client.left.set()
        await asyncio.sleep(0.01)  # gone before the stream starts
        await EventStream(events(3, closed, first), watch)({}, client.receive, client.send)
        return client, closed, watch, watcher

    client, closed, watch, watcher = asyncio.run(main())
    assert watch.left and watch.watcher is watcher and watcher.done()
    assert closed == [True] and b"" not in client.bodies()  # ended at its first wait, unfinished


def test_only_posts_to_the_generation_routes_take_the_hot_path():
    seen = []

    async def app(scope, receive, send):
        seen.append(("app", scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def serve(request, endpoint):
        seen.append(("hot", endpoint, (await request.body()).decode()))

        async def answer(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        return answer

    routes = GenerationRoutes(app, {"/v1/chat/completions": "chat"}, serve)

    async def main():
        transport = httpx.ASGITransport(app=routes, root_path="/proxy")
        async with httpx.AsyncClient(transport=transport, base_url="http://t/proxy") as client:
            await client.post("/v1/chat/completions", content=b"{}")
            await client.get("/v1/chat/completions")
            await client.post("/v1/models", content=b"{}")

    asyncio.run(main())
    assert seen == [
        ("hot", "chat", "{}"),
        ("app", "GET", "/proxy/v1/chat/completions"),
        ("app", "POST", "/proxy/v1/models"),
    ]


def test_the_route_path_leaves_out_the_root_path_a_proxy_or_mount_set():
    assert route_path({"path": "/v1/completions"}) == "/v1/completions"
    assert route_path({"path": "/api/v1/completions", "root_path": "/api"}) == "/v1/completions"
    assert route_path({"path": "/v1/completions", "root_path": "/api"}) == "/v1/completions"


def test_a_cancel_from_outside_that_meets_the_clients_leaving_is_not_swallowed():
    async def main():
        client, closed, answer = await stalled_stream()
        client.left.set()  # the watcher cancels the sender in the next turn of the loop ...
        await asyncio.sleep(0)
        answer.cancel()  # ... and the server stops in the same turn
        with pytest.raises(asyncio.CancelledError):
            await answer
        return closed

    assert asyncio.run(main()) == [True]


def test_a_receive_that_fails_ends_the_stream_and_is_logged(caplog):
    async def main():
        client, closed, never = Client(), [], asyncio.Event()

        async def broken():
            await asyncio.sleep(0.01)
            raise RuntimeError("the transport broke")

        await asyncio.wait_for(EventStream(events(5, closed, never))({}, broken, client.send), 5)
        return closed

    assert asyncio.run(main()) == [True]
    assert "receive failed during a request" in caplog.text and "the transport broke" in caplog.text


def test_an_app_given_with_its_own_checks_keeps_them_on_the_generation_routes():
    from fastapi import Depends, FastAPI, Header, HTTPException

    from engine.api import create_api
    from engine.registry import load_registry
    from loadtest.no_model import NoModelEngine

    def api_key(x_key: str = Header("")):
        if x_key != "k":
            raise HTTPException(401, "no key")

    registry = load_registry(ROOT / "adapters.yaml")
    engine = NoModelEngine("base", [a.name for a in registry.adapters], 0)
    guarded = create_api(engine, registry, app=FastAPI(dependencies=[Depends(api_key)]))
    plain = create_api(NoModelEngine("base", [], 0), registry)
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def post(app, headers, stream=False):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answer = await client.post(
                "/v1/chat/completions", json=body | {"stream": stream}, headers=headers
            )
            return answer.status_code, answer.text

    async def main():
        return [
            await post(guarded, {}),
            await post(guarded, {"x-key": "k"}),
            await post(guarded, {"x-key": "k"}, stream=True),  # FastAPI's route sends the stream
            await post(plain, {}),
        ]

    refused, allowed, streamed, served = asyncio.run(main())
    assert refused[0] == 401 and allowed[0] == 200 and served[0] == 200
    assert streamed[0] == 200 and streamed[1].rstrip().endswith("data: [DONE]")
    assert not any(m.cls is GenerationRoutes for m in guarded.user_middleware)
    assert any(m.cls is GenerationRoutes for m in plain.user_middleware)
