"""The engine behind ``python -m loadtest.http_ceiling --target api``: tokens without a model.

(Locust skips files starting with ``_`` when it is pointed at this folder.)
"""

from __future__ import annotations

import asyncio

from engine.interface import (
    Chunk,
    Engine,
    GenerationRequest,
    RequestClock,
    RequestEndedError,
    Usage,
)
from engine.registry import HFSettings


class NoModelEngine(Engine):
    """Streams " word" ``max_tokens`` times for the base or any adapter it knows, one token per
    open stream each ``gap_s`` step (all streams in step, like a GPU batch); no model. It stands
    in for the GPU to measure what the API itself costs per token."""

    backend = "no-model"

    def __init__(self, base_model_id: str, adapters: list[str], gap_s: float):
        self.base_model_id, self.names, self.gap_s = base_model_id, set(adapters), gap_s
        self.running = 0
        self.step: asyncio.Future | None = None
        self.ended: dict[str, str] = {}
        self.base_dir, self.device, self.adapter_paths = "", "cpu", {}
        self.settings = HFSettings()

    async def next_step(self) -> None:
        if not self.gap_s:
            return await asyncio.sleep(0)
        if self.step is None:
            self.step = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(self.gap_s, self.tick)
        await asyncio.shield(self.step)  # a cancelled stream must not cancel everyone's step

    def tick(self) -> None:
        step, self.step = self.step, None
        step.set_result(None)

    async def stream(self, request: GenerationRequest):
        request.validate()
        self.check_adapter(request.adapter)
        clock, tokens = RequestClock(), request.params.max_tokens
        self.running += 1
        try:
            for i in range(1, tokens + 1):
                await self.next_step()
                if request.request_id in self.ended:
                    raise RequestEndedError(self.ended.pop(request.request_id))
                clock.token()
                if i < tokens:
                    yield Chunk(" word", [1])
            yield Chunk(" word", [1], "length", Usage(8, tokens), clock.timings(tokens))
        finally:
            self.running -= 1

    def adapters(self) -> list[str]:
        return sorted(self.names)

    async def load_adapter(self, name: str, path: str, max_rank: int | None = None) -> None:
        self.names.add(name)

    def abort(self, request_id: str, why: str) -> None:
        self.ended[request_id] = why

    async def unload_adapter(self, name: str) -> None:
        self.check_adapter(name)
        self.names.discard(name)

    def stats(self) -> dict:
        return {"running": self.running, "queued": 0, "adapters_loaded": len(self.names)}

    async def shutdown(self) -> None:
        pass
