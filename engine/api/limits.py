"""The front door: the API key of the ``/v1`` routes, a body-size limit enforced before a body
is read, a last-resort handler that turns any uncaught exception into an OpenAI-shaped 500
on a connection that stays open, and WebSocket handshakes refused in OpenAI's shape."""

from __future__ import annotations

import json
import logging
import secrets

from starlette.routing import Match, WebSocketRoute

from ..interface import clipped
from ..metrics import Metrics
from .hot_path import route_path

log = logging.getLogger(__name__)


def error_body(status: int, message: str, kind: str) -> bytes:
    error = {"message": message, "type": kind, "param": None, "code": status}
    return json.dumps({"error": error}).encode()


async def respond(send, status: int, message: str, kind: str) -> None:
    body = error_body(status, message, kind)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def refuse_handshake(scope, send, status: int, message: str, kind: str) -> None:
    """A WebSocket handshake answered with an HTTP error in OpenAI's shape where the server can
    send one (ASGI's ``websocket.http.response``), else closed (1008: policy violation)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        return await send({"type": "websocket.close", "code": 1008})
    body = error_body(status, message, kind)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


class ApiKey:
    """ASGI middleware: every ``/v1`` request, and one to ``KEYED_ROOT_PATHS`` but those in
    ``open_paths``, needs ``Authorization: Bearer <key>`` (or the admin token, which an admin call
    carries in the same header), else a 401 in OpenAI's shape before its body is read, counted in
    ``/metrics``; a WebSocket handshake to such a path too (no route serves one: the key comes
    first). A preflight (``OPTIONS``) carries no key and goes on; so does ``/health``, its
    scope's state saying whether the key came (``shows_details``). Added only when a key is set
    (``guard_v1``): without one it costs nothing."""

    def __init__(
        self,
        app,
        key: str,
        admin_token: str | None,
        metrics: Metrics | None,
        open_paths: tuple[str, ...] = (),
    ):
        self.app, self.metrics, self.open_paths = app, metrics, open_paths
        self.accepted = [secret.strip().encode() for secret in (key, admin_token) if secret]

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        paths = (route_path(scope), scope["path"])
        if BRIEF_WITHOUT_KEY in paths:
            keyed = self.refusal(authorization(scope)) is None
            scope.setdefault("state", {})[KEYED_STATE] = keyed
            return await self.app(scope, receive, send)
        if not any(map(needs_key, paths)) or any(path in self.open_paths for path in paths):
            return await self.app(scope, receive, send)
        if why := self.refusal(authorization(scope)):
            if self.metrics is not None:
                self.metrics.error("none", "invalid_request_error", 401)
            if scope["type"] == "websocket":
                return await refuse_handshake(scope, send, 401, why, "invalid_request_error")
            return await respond(send, 401, why, "invalid_request_error")
        await self.app(scope, receive, send)

    def refusal(self, given: bytes | None) -> str | None:
        """Why ``given`` (the Authorization header) is refused, or None; compared in constant
        time with each accepted value."""
        if not given:
            return "You didn't provide an API key: send Authorization: Bearer <LORALAND_API_KEY>"
        token = bearer_token(given.decode("latin-1"))
        if token is None:
            return "Incorrect API key provided: send Authorization: Bearer <LORALAND_API_KEY>"
        given_bytes = token.encode("latin-1")
        matches = [secrets.compare_digest(given_bytes, accepted) for accepted in self.accepted]
        return None if any(matches) else "Incorrect API key provided"


def guard_v1(
    app,
    key: str | None,
    admin_token: str | None,
    metrics: Metrics | None = None,
    open_metrics: bool = False,
):
    """``ApiKey`` on ``app`` when ``key`` (``LORALAND_API_KEY``) is set, ``/metrics`` left open
    with ``open_metrics``; nothing otherwise."""
    if key and key.strip():
        open_paths = (METRICS_PATH,) if open_metrics else ()
        app.add_middleware(
            ApiKey, key=key, admin_token=admin_token, metrics=metrics, open_paths=open_paths
        )
        also = "/tokenize" + ("" if open_metrics else ", /metrics")
        log.info("the /v1 routes and %s need the API key (LORALAND_API_KEY)", also)


def bearer(secret: str | None) -> dict[str, str]:
    """The header a client sends to pass ``ApiKey`` (or an admin check); none without a secret."""
    return {"Authorization": f"Bearer {secret.strip()}"} if secret and secret.strip() else {}


def bearer_token(authorization: str) -> str | None:
    """The token of ``Bearer <token>`` (the scheme in any case, spaces around ignored, as RFC
    7235 reads it), or None for another scheme or none."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


METRICS_PATH = "/metrics"
KEYED_ROOT_PATHS = ("/tokenize", "/detokenize", METRICS_PATH)
"""Routes outside ``/v1`` that the key guards too: vLLM's and SGLang's token routes, and the
metrics, which name every adapter (``server.open_metrics`` leaves them open)."""
BRIEF_WITHOUT_KEY = "/health"
"""Open to a liveness probe without the key, but then it names no model or adapter."""
KEYED_STATE = "loraland.keyed"
"""The scope's state entry ``ApiKey`` sets on a ``BRIEF_WITHOUT_KEY`` request: the key came."""


def shows_details(scope, key: str | None) -> bool:
    """May ``/health`` name what is served: no key is set, or ``ApiKey`` saw this request carry
    it (anything else, a path it did not recognise say, gets the brief answer)."""
    return not (key and key.strip()) or scope.get("state", {}).get(KEYED_STATE) is True


def needs_key(path: str) -> bool:
    """Under ``/v1`` or one of ``KEYED_ROOT_PATHS`` (``ApiKey`` asks it of the path as the app
    routes it and as the client sent it: either one says so)."""
    return path == "/v1" or path.startswith("/v1/") or path in KEYED_ROOT_PATHS


def authorization(scope) -> bytes | None:
    return next((value for name, value in scope["headers"] if name == b"authorization"), None)


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


class RefuseWebSockets:
    """ASGI middleware: a WebSocket handshake that no WebSocket route of ``router`` takes (the
    API has none; Gradio 6 has none: a mount at ``/`` would take it and answer Starlette's empty
    403) gets a 404 in OpenAI's shape where the server can send one (ASGI's
    ``websocket.http.response``), counted in ``metrics`` (if given) as other unknown routes are;
    the OpenAI SDK's Realtime client opens ``/v1/realtime``."""

    def __init__(self, app, router, metrics: Metrics | None):
        self.app, self.router, self.metrics = app, router, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket" or self.taken(scope):
            return await self.app(scope, receive, send)
        message = (f"no WebSocket endpoint at {clipped(scope['path'])}: this server answers HTTP "
                   "alone (no Realtime API); POST /v1/chat/completions with stream: true sends "
                   "server-sent events")  # fmt: skip
        if self.metrics is not None:
            self.metrics.error("none", "not_found_error", 404)
        await refuse_handshake(scope, send, 404, message, "not_found_error")

    def taken(self, scope) -> bool:
        return any(isinstance(route, WebSocketRoute) and route.matches(scope)[0] == Match.FULL
                   for route in self.router.routes)  # fmt: skip
