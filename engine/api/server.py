"""Run an app with the API under uvicorn, draining on SIGTERM/SIGINT: new requests are refused,
running streams get ``server.drain_seconds`` (adapters.yaml) to finish, then end with an error
chunk and ``[DONE]``; the engine is shut down (its worker threads and processes, SGLang's
scheduler) and the process exits shortly after."""

from __future__ import annotations

import asyncio
import logging
import re

import uvicorn
from fastapi import FastAPI
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from ..metrics import freeze_heap
from .limits import error_body

GRACE_SECONDS = 5.0
"""After the drain deadline: time for the ended streams' last events to go out."""
UNPARSABLE = (
    "Invalid HTTP request: its request line, a header or its body's framing could not be parsed."
)


MAX_HEAD_BYTES = 64 * 1024
"""On httptools, a request's line and headers at most across reads (httptools has no limit of
its own; h11 stops an incomplete head at 16 KB): past it, a 431 and the connection closes."""


HEAD_SECONDS = 30.0
"""On httptools, a request's head arrives within this (of the connection's opening, or of its
first byte after a kept-alive answer), or a 408 closes the connection (a client sending its
headers a byte at a time, or nothing, holds a connection, not the event loop)."""


BODY_SECONDS = 60.0
"""On httptools, a request's body arrives within this of its head, or a 408 closes the
connection (a body sent a byte at a time held its connection for as long as the client liked;
a body of ``server.max_body_bytes``, 1 MB by default, needs 17 KB/s)."""


H2C_UPGRADE = re.compile(rb"\r\nupgrade:[ \t]*h2c[ \t]*(?=\r\n)", re.IGNORECASE)
"""The offer of HTTP/2 that ``curl --http2`` adds to a plain-text request."""


def without_h2c_upgrade(data: bytes) -> bytes:
    """``data`` without an ``Upgrade: h2c`` header in the head it begins with: httptools stops
    parsing at a head that offers an upgrade, so the app saw the request without its body (a
    400 "not valid JSON"). A server without HTTP/2 answers as though the header were absent
    (RFC 7540, section 3.2). Only for a read that begins a head (as curl sends one): a head split
    over reads, or begun after a body in the same read, keeps it."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    head, found = H2C_UPGRADE.subn(b"", data[: end + 2], count=1)
    return head + data[end + 2 :] if found else data


def http_protocol(name: str = "auto") -> type:
    """uvicorn's HTTP implementation ``name`` ("auto": httptools where installed, else h11)
    answering bytes it cannot parse as HTTP with a 400 in OpenAI's error shape instead of
    uvicorn's plain text (the app never sees such a request; the connection closes, as before),
    and, on httptools, a head over ``MAX_HEAD_BYTES`` with a 431, a head or a body too slow
    with a 408."""
    base = import_from_string(HTTP_PROTOCOLS[name])
    mixin = HttpToolsSlowClients if hasattr(base, "on_headers_complete") else OpenAIErrors
    return type(f"{base.__name__}WithOpenAIErrors", (mixin, base), {})


def send_error_and_close(protocol, status: int, reason: str, message: str) -> None:
    body = error_body(status, message, "invalid_request_error")
    lines = [b"HTTP/1.1 %d %s" % (status, reason.encode())]
    lines += [field + b": " + value for field, value in protocol.server_state.default_headers]
    lines += [b"content-type: application/json", b"content-length: %d" % len(body)]
    lines += [b"connection: close", b"", body]
    protocol.transport.write(b"\r\n".join(lines))
    protocol.transport.close()


class OpenAIErrors:
    def send_400_response(self, msg: str) -> None:
        send_error_and_close(self, 400, "Bad Request", UNPARSABLE)


class HttpToolsSlowClients(OpenAIErrors):
    """Counts the bytes read while a request's head is incomplete (from the parser's
    ``on_message_begin`` to its ``on_headers_complete``) and, before the parser sees a read,
    those up to the end of a head that ends in it; gives a head that does not come in one
    read ``HEAD_SECONDS`` and a body that does not come with its head ``BODY_SECONDS``. A
    pipelined request's head that begins in the read that ends the body before it counts from
    the next read (clients rarely pipeline)."""

    in_head = False
    in_body = False
    head_bytes = 0
    head_begun = False
    """Bytes of a head still incomplete came in an earlier read (a blank line in this one may
    be the body's, so nothing is taken out of it)."""
    head_timer: asyncio.TimerHandle | None = None
    body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.in_head = True  # a connection that sends nothing at all is timed as a slow head
        self.head_timer = self.loop.call_later(HEAD_SECONDS, self.head_too_slow)

    def on_message_begin(self) -> None:
        self.in_head, self.head_bytes = True, 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.in_head, self.in_body, self.head_bytes = False, True, 0
        self.head_begun = False
        self.head_timer = cancelled(self.head_timer)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_body = False
        self.body_timer = cancelled(self.body_timer)
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self.head_timer = cancelled(self.head_timer)
        self.body_timer = cancelled(self.body_timer)
        super().connection_lost(exc)

    def head_too_slow(self) -> None:
        if self.in_head and not self.transport.is_closing():
            message = f"the request line and headers took longer than {HEAD_SECONDS:.0f} s"
            send_error_and_close(self, 408, "Request Timeout", message)

    def body_too_slow(self) -> None:
        if not self.in_body or self.transport.is_closing():
            return
        if self.pipeline or self.flow.read_paused:  # the server is not reading: not the client
            self.body_timer = self.loop.call_later(BODY_SECONDS, self.body_too_slow)
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # answered already (e.g. refused by its Content-Length)
            return
        message = f"the request body took longer than {BODY_SECONDS:.0f} s after its headers"
        send_error_and_close(self, 408, "Request Timeout", message)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        began_in_body = self.in_body
        if not began_in_body:
            if not self.head_begun:  # this read begins the head: its first blank line ends it
                data = without_h2c_upgrade(data)
            if self.head_ends_too_large(data):
                return
        super().data_received(data)
        if self.transport.is_closing():
            return
        self.head_begun = self.in_head
        if self.in_body and self.body_timer is None:  # armed only for a body still incomplete
            self.body_timer = self.loop.call_later(BODY_SECONDS, self.body_too_slow)
        if not self.in_head:
            return
        # a head still incomplete after these bytes; one that began after a body in this read
        # counts from the next read (undercounted by at most one read, not the body's bytes)
        self.head_bytes += 0 if began_in_body else len(data)
        if self.head_timer is None:  # armed only for a head that did not come in one read
            self.head_timer = self.loop.call_later(HEAD_SECONDS, self.head_too_slow)
        if self.head_bytes > MAX_HEAD_BYTES:
            self.refuse_large_head()

    def head_ends_too_large(self, data: bytes) -> bool:
        """A head that ends in this read (with what came of it before) over the limit: a 431
        before the parser reads it."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or self.head_bytes + end + 4 <= MAX_HEAD_BYTES:
            return False
        self.refuse_large_head()
        return True

    def refuse_large_head(self) -> None:
        message = f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes"
        send_error_and_close(self, 431, "Request Header Fields Too Large", message)


def cancelled(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the API to drain when a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, api):
        super().__init__(config)
        self.api = api
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def shutdown(self, sockets=None) -> None:
        """After uvicorn's own, on the serving loop and before uvicorn re-raises the signal (its
        default action ends the process): the engine's workers and processes end too."""
        try:
            await super().shutdown(sockets)
        finally:
            await self.api.engine.shutdown()

    def handle_exit(self, sig, frame) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.api.begin_drain)
        super().handle_exit(sig, frame)


def run_server(app: FastAPI, host: str, port: int, **uvicorn_options) -> None:
    api = app.state.api
    if api.limits.freeze_heap:
        logging.getLogger(__name__).info("froze %d objects out of the collector", freeze_heap())
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http_protocol(),
        timeout_graceful_shutdown=api.limits.drain_seconds + GRACE_SECONDS,
        **uvicorn_options,
    )
    DrainingServer(config, api).run()
