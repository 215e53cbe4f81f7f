"""Run an app with the API under uvicorn, draining on SIGTERM/SIGINT: new requests are refused,
running streams get ``server.drain_seconds`` (adapters.yaml) to finish, then end with an error
chunk and ``[DONE]``; the engine is shut down (its worker threads and processes, SGLang's
scheduler) and the process exits shortly after."""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from fastapi import FastAPI

from ..metrics import freeze_heap

GRACE_SECONDS = 5.0
"""After the drain deadline: time for the ended streams' last events to go out."""


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
        timeout_graceful_shutdown=api.limits.drain_seconds + GRACE_SECONDS,
        **uvicorn_options,
    )
    DrainingServer(config, api).run()
