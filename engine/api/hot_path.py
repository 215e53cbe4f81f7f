"""The generation routes as plain ASGI: ``POST /v1/chat/completions`` and ``POST
/v1/completions`` skip FastAPI's routing, dependency solving and exception middleware, and a
streamed answer skips ``StreamingResponse``'s task group. At 256 streams on one event loop
these costs are paid per request and per chunk by everyone waiting on that loop (issue #16);
``python lab/asgi_cost.py`` measures them. Every other request, and every other method on these
paths, goes on to the FastAPI app unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import Request

EVENT_STREAM = [(b"content-type", b"text/event-stream; charset=utf-8")]


class GenerationRoutes:
    """ASGI middleware: the generation routes in ``routes`` (path → endpoint name) answered by
    ``serve(request, endpoint)``, which returns an ASGI response (an error response included);
    sits inside ``BodyLimit``, so the body is checked and an uncaught error is still a 500 in
    OpenAI's shape."""

    def __init__(self, app, routes: dict[str, str], serve: Callable[[Request, str], Awaitable]):
        self.app, self.routes, self.serve = app, routes, serve

    async def __call__(self, scope, receive, send):
        endpoint = self.routes.get(route_path(scope)) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        response = await self.serve(Request(scope, receive), endpoint)
        await response(scope, receive, send)


def route_path(scope) -> str:
    """The path the app routes on: without the ``root_path`` a proxy or a mount put in front."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class EventStream:
    """A streamed answer: SSE events (bytes) sent as they are made. A client that goes away
    ends it: a watcher task waits for ``http.disconnect`` and cancels the sender, which closes
    the events' generator (the generation is aborted there)."""

    def __init__(self, events: AsyncIterator[bytes]):
        self.events = events

    async def __call__(self, scope, receive, send):
        sender, done = asyncio.current_task(), False

        def client_left(watcher: asyncio.Task) -> None:
            if not done and not watcher.cancelled():
                sender.cancel()

        watcher = asyncio.ensure_future(until_disconnect(receive))
        watcher.add_done_callback(client_left)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": EVENT_STREAM})
            async with contextlib.aclosing(self.events) as events:
                async for event in events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not (watcher.done() and not watcher.cancelled()):
                raise  # cancelled from outside (the server stopping), not by the watcher
            sender.uncancel()
        except OSError:
            pass  # a server on ASGI spec 2.4 says the client left by failing the send
        finally:
            done = True
            watcher.cancel()


async def until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
