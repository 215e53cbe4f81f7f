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
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger(__name__)
FASTAPI_HANDLERS = {HTTPException, RequestValidationError, WebSocketRequestValidationError}

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


class HeadAsGet:
    """ASGI middleware: ``HEAD`` on a read-only route is answered as its ``GET`` (the server
    sends the headers only), as HTTP asks of every ``GET`` route and uptime checks use it;
    FastAPI's routes answer only the methods they name."""

    def __init__(self, app, is_read_only: Callable[[str], bool]):
        self.app, self.is_read_only = app, is_read_only

    async def __call__(self, scope, receive, send):
        head = scope["type"] == "http" and scope["method"] == "HEAD"
        if head and self.is_read_only(route_path(scope)):
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


def why_fastapi_routes(app: FastAPI, paths) -> str | None:
    """Why the generation routes of ``app`` must go through FastAPI (None: they need not). An
    app made elsewhere (``create_api(app=...)``) may bring what the bypass would skip: its own
    middleware (inside ours), app-wide dependencies (an API-key check), exception handlers, or
    routes of its own on these paths."""
    if app.user_middleware:
        return "the app has middleware of its own"
    if app.router.dependencies:
        return "the app has dependencies"
    if set(app.exception_handlers) - FASTAPI_HANDLERS:
        return "the app has exception handlers of its own"
    if any(getattr(route, "path", None) in paths for route in app.routes):
        return "the app has routes of its own on these paths"
    return None


def route_path(scope) -> str:
    """The path the app routes on: without the ``root_path`` a proxy or a mount put in front."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path == root:
        return ""
    if root and path.startswith(root) and path[len(root)] == "/":
        return path[len(root) :]  # only at a segment's end, as Starlette's router strips it
    return path


class CancelOnDisconnect:
    """``async with CancelOnDisconnect(receive) as watch:`` — the client's ``http.disconnect``
    cancels the task inside (its streams close there, which aborts their generations) and the
    block ends early with ``watch.left`` set. A cancel from outside (the server stopping) still
    propagates. Only once the request's body is read: the watcher consumes ``receive``.

    One request's blocks, one after the other (its first token, then the rest of its answer or
    its stream), enter the same watch: one watcher task serves them all, and a client that left
    between two blocks ends the next at once. ``close()`` stops the watcher (else the answer's
    end does: the server then says ``http.disconnect``)."""

    def __init__(self, receive):
        self.receive, self.left, self.inside = receive, False, False
        self.watcher: asyncio.Future | None = None

    async def __aenter__(self) -> CancelOnDisconnect:
        self.task, self.inside = asyncio.current_task(), True
        if self.watcher is None:
            self.watcher = asyncio.ensure_future(until_disconnect(self.receive))
            self.watcher.add_done_callback(self.watcher_done)
        elif self.watcher.done() and not self.watcher.cancelled():
            self.leave()  # between two blocks
        return self

    def watcher_done(self, watcher: asyncio.Future) -> None:
        if watcher.cancelled():
            return
        if watcher.exception() is not None:  # the answer ends as if the client had left
            log.error("receive failed during a request", exc_info=watcher.exception())
        if self.inside:
            self.leave()

    def leave(self) -> None:
        self.left = True
        self.task.cancel()

    async def __aexit__(self, kind, error, traceback) -> bool:
        self.inside = False
        if not self.left:
            return False
        self.close()
        from_outside = self.task.uncancel() > 0
        ours = kind is not None and issubclass(kind, (asyncio.CancelledError, Exception))
        return ours and not from_outside  # what the cancel became inside ends here too

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()


def client_left() -> Response:
    """The answer to a client that has left (``CancelOnDisconnect``): nginx's 499, which the
    server drops unsent; a response all the same, for middleware that expects one."""
    return Response(status_code=499)


class EventStream(Response):
    """A streamed answer: SSE events (bytes) sent as they are made. A client that goes away
    ends it (``watch``, the request's own if it has one): the events' generator is closed,
    which aborts the generation."""

    def __init__(self, events: AsyncIterator[bytes], watch: CancelOnDisconnect | None = None):
        self.events, self.watch = events, watch  # a Response, for FastAPI's routes too
        self.background, self.status_code = None, 200

    async def __call__(self, scope, receive, send):
        watch = self.watch or CancelOnDisconnect(receive)
        try:
            async with watch:
                await self.send_events(send)
        finally:
            watch.close()

    async def send_events(self, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": EVENT_STREAM})
            async with contextlib.aclosing(self.events) as events:
                async for event in events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # a server on ASGI spec 2.4 says the client left by failing the send


async def until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
