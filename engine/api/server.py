"""Run an app with the API under uvicorn, draining on SIGTERM/SIGINT: new requests are refused,
running streams get ``server.drain_seconds`` (adapters.yaml) to finish, then end with an error
chunk and ``[DONE]``; the engine is shut down (its worker threads and processes, SGLang's
scheduler) and the process exits shortly after."""

from __future__ import annotations

import asyncio
import logging

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


def http_protocol(name: str = "auto") -> type:
    """uvicorn's HTTP implementation ``name`` ("auto": httptools where installed, else h11)
    answering bytes it cannot parse as HTTP with a 400 in OpenAI's error shape instead of
    uvicorn's plain text (the app never sees such a request; the connection closes, as before)."""
    base = import_from_string(HTTP_PROTOCOLS[name])

    def send_400_response(self, msg: str) -> None:
        body = error_body(400, UNPARSABLE, "invalid_request_error")
        lines = [b"HTTP/1.1 400 Bad Request"]
        lines += [field + b": " + value for field, value in self.server_state.default_headers]
        lines += [b"content-type: application/json", b"content-length: %d" % len(body)]
        lines += [b"connection: close", b"", body]
        self.transport.write(b"\r\n".join(lines))
        self.transport.close()

    methods = {"send_400_response": send_400_response}
    return type(f"{base.__name__}WithOpenAIErrors", (base,), methods)


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
