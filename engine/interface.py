"""The one engine interface both backends implement, and the types that cross it.

A request names an adapter (or ``None`` for the base model) and carries either a raw prompt or
chat messages. ``Engine.stream`` yields ``Chunk`` deltas; the last chunk has ``finish_reason``,
``usage`` and ``timings`` set. An unknown adapter raises ``AdapterNotFoundError`` — the engine
never silently answers with the base model.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel


class EngineError(Exception):
    """Base class of the errors an engine raises for a bad request or a failed operation."""

    status_code = 500
    error_type = "server_error"


class InvalidRequestError(EngineError):
    """The request is malformed (bad sampling parameter, empty prompt, ...)."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """Prompt plus requested output does not fit the model's context."""

    status_code = 413


class AdapterNotFoundError(EngineError):
    """The request names an adapter the engine does not serve."""

    status_code = 404
    error_type = "not_found_error"

    def __init__(self, name: str, available: list[str]):
        listed = ", ".join(sorted(available)) or "none"
        super().__init__(f"adapter '{name}' is not loaded (loaded: {listed})")
        self.name = name


class AdapterLoadError(EngineError):
    """An adapter could not be loaded or unloaded (bad path, wrong base, shape mismatch)."""

    status_code = 422
    error_type = "invalid_request_error"


@dataclass
class SamplingParams:
    """Generation settings of one request; ``temperature == 0`` means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def validate(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "must be in [0, 2]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("stop", len(self.stop) <= 4 and all(self.stop), "at most 4 non-empty strings"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InvalidRequestError(f"{name} {rule}, got {getattr(self, name)!r}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """One generation: ``adapter=None`` asks for the base model."""

    adapter: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def validate(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", "prompt")
        if self.prompt is not None and not self.prompt:
            raise InvalidRequestError("prompt is empty", "prompt")
        if self.messages is not None:
            validate_messages(self.messages)
        self.params.validate()


def validate_messages(messages: list[dict]) -> None:
    if not messages:
        raise InvalidRequestError("messages is empty", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in {
            "system",
            "user",
            "assistant",
        }:
            raise InvalidRequestError(
                f"messages[{i}].role must be system, user or assistant", "messages"
            )
        if not isinstance(message.get("content"), str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", "messages")


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Seconds measured from the moment the engine received the request."""

    queue_s: float
    ttft_s: float | None
    e2e_s: float
    decode_tokens_per_s: float | None


@dataclass
class Chunk:
    """A streamed delta; the final one carries ``finish_reason`` ("stop" | "length"),
    ``usage`` and ``timings``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass
class Completion:
    """A whole generation, as ``Engine.generate`` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timings: Timings


class RequestClock:
    """Collects the timestamps of one request and turns them into ``Timings``."""

    def __init__(self) -> None:
        self.received = time.perf_counter()
        self.started: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None

    def start(self) -> None:
        self.started = self.started or time.perf_counter()

    def token(self) -> None:
        now = time.perf_counter()
        self.start()
        self.first_token = self.first_token or now
        self.last_token = now

    def timings(self, completion_tokens: int) -> Timings:
        now = time.perf_counter()
        started = self.started or now
        rate = None
        if completion_tokens > 1 and self.last_token and self.first_token:
            span = self.last_token - self.first_token
            rate = (completion_tokens - 1) / span if span > 0 else None
        return Timings(
            queue_s=started - self.received,
            ttft_s=None if self.first_token is None else self.first_token - self.received,
            e2e_s=now - self.received,
            decode_tokens_per_s=rate,
        )


class Engine(ABC):
    """What the API, the app, the load test and the evaluator talk to."""

    backend: str
    """``hf`` (the CPU default: transformers + peft) or ``sglang`` (GPU)."""
    base_model_id: str
    """The base model's id as the API shows it."""
    base_dir: str
    """The base model's local directory (or hub id)."""
    device: str
    """Where it runs, for people: ``cpu`` or the GPU's name."""
    settings: BaseModel
    """This backend's settings from the registry (``HFSettings`` or ``SGLangSettings``)."""
    adapter_paths: dict[str, str]
    """Directory of every adapter requests may name, by name."""

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield deltas; closing the iterator early cancels the generation and frees its slot."""

    @abstractmethod
    def adapters(self) -> list[str]:
        """Names of the adapters requests may name now."""

    @abstractmethod
    async def load_adapter(self, name: str, path: str) -> None: ...

    @abstractmethod
    async def unload_adapter(self, name: str) -> None: ...

    def adapter_slots(self) -> int | None:
        """Distinct adapters one running batch can hold; ``None``: no limit."""
        return None

    @abstractmethod
    def stats(self) -> dict:
        """Gauges: ``running`` and ``queued`` requests, ``adapters_loaded``."""

    @abstractmethod
    async def shutdown(self) -> None: ...

    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters():
            raise AdapterNotFoundError(name, self.adapters())

    async def complete(self, request: GenerationRequest) -> Completion:
        parts: list[Chunk] = [chunk async for chunk in self.stream(request)]
        last = parts[-1]
        return Completion(
            text="".join(p.text for p in parts),
            token_ids=[t for p in parts for t in p.token_ids],
            finish_reason=last.finish_reason or "stop",
            usage=last.usage or Usage(0, 0),
            timings=last.timings or Timings(0.0, None, 0.0, None),
        )

    async def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Run a batch concurrently; the backend batches the rows together."""
        return list(await asyncio.gather(*(self.complete(r) for r in requests)))

    async def health(self) -> dict:
        """Answer a one-token generation on the base model."""
        probe = GenerationRequest(prompt="Hi", params=SamplingParams(max_tokens=1))
        done = await self.complete(probe)
        return {
            "ok": done.usage.completion_tokens == 1,
            "backend": self.backend,
            "base_model": self.base_model_id,
            "adapters": self.adapters(),
            **self.stats(),
        }
