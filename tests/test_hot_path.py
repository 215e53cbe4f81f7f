"""The generation routes' plain-ASGI path (engine/api/hot_path.py): a streamed answer ends when
its client leaves and only then, and other requests reach the FastAPI app as before. The live
server's side (a disconnect aborting the generation, every error shape) is in test_api.py and
test_hostile_inputs.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from engine.api.hot_path import EventStream, GenerationRoutes, route_path


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
        client, closed, never = Client(), [], asyncio.Event()
        answer = asyncio.ensure_future(
            EventStream(events(5, closed, never))({}, client.receive, client.send)
        )
        await asyncio.sleep(0.01)
        client.left.set()
        await asyncio.wait_for(answer, 5)  # returns: the client's leaving is not an error
        return client, closed, answer

    client, closed, answer = asyncio.run(main())
    assert client.bodies() == [b"data: 0\n\n", b"data: 1\n\n"]  # no end of body: nobody to read it
    assert closed == [True] and not answer.cancelled()


def test_a_stream_cancelled_from_outside_stays_cancelled():
    async def main():
        client, closed, never = Client(), [], asyncio.Event()
        answer = asyncio.ensure_future(
            EventStream(events(5, closed, never))({}, client.receive, client.send)
        )
        await asyncio.sleep(0.01)
        answer.cancel()  # e.g. the server stopping
        with pytest.raises(asyncio.CancelledError):
            await answer
        return closed

    assert asyncio.run(main()) == [True]


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
