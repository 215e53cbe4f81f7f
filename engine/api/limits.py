"""The front door: a body-size limit enforced before a body is read, and a last-resort handler
that turns any uncaught exception into an OpenAI-shaped 500 on a connection that stays open."""

from __future__ import annotations

import json
import logging

from ..metrics import Metrics

log = logging.getLogger(__name__)


def error_body(status: int, message: str, kind: str) -> bytes:
    error = {"message": message, "type": kind, "param": None, "code": status}
    return json.dumps({"error": error}).encode()


async def respond(send, status: int, message: str, kind: str) -> None:
    body = error_body(status, message, kind)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets a 413 without being read (by its
    ``Content-Length``) or as soon as the bytes read pass the limit (chunked uploads). Bodies
    under the limit are read once and handed on whole. An exception no handler took becomes a
    500 in OpenAI's shape (counted in ``/metrics``) instead of a reset connection."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.declared_length(scope) > self.max_bytes:
            return await self.too_large(send)
        body, more = await self.read(receive)
        if body is None:
            return await self.too_large(send)
        started = False

        async def replay():
            nonlocal body
            if body is not None:
                message, body = {"type": "http.request", "body": body, "more_body": more}, None
                return message
            return await receive()

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked_send)
        except Exception:
            log.exception("uncaught error on %s %s", scope.get("method"), scope.get("path"))
            self.metrics.error("unknown", "server_error", 500)
            if not started:
                await respond(send, 500, "internal error (logged on the server)", "server_error")

    @staticmethod
    def declared_length(scope) -> int:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    async def read(self, receive) -> tuple[bytes | None, bool]:
        """The whole body (None if it passes the limit); ``more`` is False once it is read."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None, False
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks), False

    async def too_large(self, send) -> None:
        self.metrics.error("unknown", "invalid_request_error", 413)
        message = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        await respond(send, 413, message, "invalid_request_error")
