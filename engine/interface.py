"""The one engine interface both backends implement, and the types that cross it.

A request names an adapter (or ``None`` for the base model) and carries either a raw prompt or
chat messages. ``Engine.stream`` yields ``Chunk`` deltas; the last chunk has ``finish_reason``,
``usage`` and ``timings`` set. An unknown adapter raises ``AdapterNotFoundError`` — the engine
never silently answers with the base model.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from .constraints import Constraint


def clipped(text: str, limit: int = 200) -> str:
    """What a client sent, as an error message quotes it: at most ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


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
    """Prompt plus requested output does not fit the model's context: a 400, as OpenAI and vLLM
    answer it (clients such as LiteLLM tell it from other 400s by "maximum context length")."""


class AdapterNotFoundError(EngineError):
    """The request names an adapter the engine does not serve."""

    status_code = 404
    error_type = "not_found_error"

    def __init__(self, name: str, available: list[str]):
        listed = ", ".join(sorted(available)) or "none"
        super().__init__(f"adapter '{name}' is not loaded (loaded: {listed})")
        self.name = name


class RequestEndedError(EngineError):
    """The server ended a running request: it is shutting down, or its adapter was unloaded."""

    status_code = 503
    error_type = "server_error"


class AdapterLoadError(EngineError):
    """An adapter could not be loaded or unloaded (bad path, wrong base, shape mismatch)."""

    status_code = 422
    error_type = "invalid_request_error"


class AdapterConflictError(AdapterLoadError):
    """The name is taken: an adapter of that name is loaded, or being loaded or unloaded."""

    status_code = 409
    error_type = "conflict_error"
    param = "name"


MAX_STOP_CHARS = 1000
"""A stop string's length at most: every token is checked against each stop string's prefixes."""


MIN_REPETITION_PENALTY = 0.01
"""The smallest repetition penalty: far below it a divided logit overflows to inf and the
probabilities become NaN, which the sampler refuses (a 500 on the CPU backend; SGLang's penalizer
divides the same way). At 0.01 a generated token's logit is already a hundred times larger."""


def stop_problem(stops: list[str]) -> str | None:
    """What is wrong with these stop strings (a request's or an adapter's default), or None."""
    if len(stops) > 4 or not all(stops):
        return "at most 4 non-empty strings"
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        return f"each stop string non-empty and at most {MAX_STOP_CHARS} characters"
    return None


@dataclass
class SamplingParams:
    """Generation settings of one request. The defaults here are the server-wide ones (OpenAI's,
    plus a length cap); ``engine.sampling.resolve`` lays an adapter's defaults and the request's
    values over them. ``temperature == 0`` means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = off (the API also takes -1, as vLLM and SGLang do)."""
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id → bias added to its logit (-100 bans it, 100 forces it)."""
    min_p: float = 0.0
    """vLLM's and SGLang's: tokens less likely than ``min_p`` × the most likely one's probability
    (after temperature, top-k and top-p) are left out; 0 = off."""
    repetition_penalty: float = 1.0
    """SGLang's (and HF's): each token generated so far has its logit divided by this when
    positive, multiplied when negative; 1 = off, at least ``MIN_REPETITION_PENALTY``. (vLLM
    counts the prompt's tokens too.)"""
    min_tokens: int = 0
    """vLLM's and SGLang's: the end-of-turn tokens are barred until this many tokens were
    generated (as SGLang's, a stop string still ends the answer)."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each token's, with the k most likely alternatives."""
    constraint: Constraint | None = None
    """Structured output: the answer matches this JSON Schema or regular expression."""
    fit_max_tokens: bool = False
    """``max_tokens`` is a default, not the request's (``engine.sampling.resolve`` sets it): a
    prompt that leaves less room in the context gets the room left, as OpenAI's and vLLM's
    default does, instead of a 400."""

    def validate(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "must be in [0, 2]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("stop", stop_problem(self.stop) is None, stop_problem(self.stop)),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2**63)"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            (
                "logit_bias",
                len(self.logit_bias) <= 300
                and all(-100 <= b <= 100 for b in self.logit_bias.values()),
                "at most 300 tokens, each bias in [-100, 100]",
            ),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            (
                "repetition_penalty",
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2.0,
                f"must be in [{MIN_REPETITION_PENALTY}, 2]",
            ),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                got = clipped(repr(getattr(self, name)))
                raise InvalidRequestError(f"{name} {rule}, got {got}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Presence or frequency penalties (added to logits)."""
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def rescales(self) -> bool:
        """A repetition penalty (multiplies logits)."""
        return self.repetition_penalty != 1.0

    def extensions(self) -> dict:
        """vLLM's and SGLang's sampling extensions this request sets, by their API names (left
        out at their defaults: a server or engine that lacks one is not asked for it)."""
        chosen = {
            "min_p": self.min_p or None,
            "repetition_penalty": self.repetition_penalty if self.rescales else None,
            "min_tokens": self.min_tokens or None,
        }
        return {name: value for name, value in chosen.items() if value is not None}

    @property
    def adjusts_logits(self) -> bool:
        """Anything that changes the logits before sampling, the grammar aside."""
        return bool(self.logit_bias) or self.penalised or self.rescales or self.min_tokens > 0


IDS = random.Random()
"""Request ids: 128 random bits from a generator of their own (seeded from ``os.urandom``, again
in a forked child), so a program seeding ``random`` cannot make two ids alike; no system call a
request, unlike ``uuid4``."""
os.register_at_fork(after_in_child=IDS.seed)


def new_id() -> str:
    """A fresh id: 32 hex digits."""
    return f"{IDS.getrandbits(128):032x}"


@dataclass
class GenerationRequest:
    """One generation: ``adapter=None`` asks for the base model."""

    adapter: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_id)
    prompt_ids: list[int] | None = None
    """A prompt given as token ids (OpenAI's token-array prompt), instead of text."""
    group: str | None = None
    """The client's request this generation is part of (its ``n`` choices, its fan-out models):
    the CPU backend lets one group hold at most three quarters of its batch (``max_batch_size``
    ≥ 2), so one request alone never takes every row from the requests after it."""

    def validate(self) -> None:
        given = [x is not None for x in (self.prompt, self.messages, self.prompt_ids)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt and messages", "prompt")
        if self.prompt is not None and not self.prompt:
            raise InvalidRequestError("prompt is empty", "prompt")
        if self.prompt_ids is not None and not self.prompt_ids:
            raise InvalidRequestError("prompt has no tokens", "prompt")
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
            "tool",
        }:
            raise InvalidRequestError(
                f"messages[{i}].role must be system, user, assistant or tool", "messages"
            )
        if not isinstance(message.get("content"), str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", "messages")
        if message.get("tool_calls") is not None and not calls_as_openai(message["tool_calls"]):
            raise InvalidRequestError(
                f"messages[{i}].tool_calls must be a list of OpenAI's calls: "
                '{"id": str, "type": "function", "function": {"name": str, "arguments": str}}',
                "messages",
            )


def calls_as_openai(calls) -> bool:
    def one(call) -> bool:
        function = call.get("function") if isinstance(call, dict) else None
        return (
            isinstance(function, dict)
            and isinstance(call.get("id"), str)
            and all(isinstance(function.get(k), str) for k in ("name", "arguments"))
        )

    return isinstance(calls, list) and all(map(one, calls))


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
class TokenLogprob:
    """One generated token's log-probability, with the most likely alternatives at its step."""

    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)
    """(token id, text, logprob) of the most likely tokens, most likely first."""


@dataclass
class Chunk:
    """A streamed delta; the final one carries ``finish_reason`` ("stop" | "length"),
    ``usage`` and ``timings``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprob] | None = None
    """With ``SamplingParams.logprobs``: one entry per token in ``token_ids``."""


@dataclass
class Completion:
    """A whole generation, as ``Engine.generate`` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = None


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
    async def load_adapter(self, name: str, path: str, max_rank: int | None = None) -> None:
        """Hot-load: refused (``AdapterLoadError``) if the name is taken or the adapter cannot
        be served here (wrong base, shapes, DoRA, rank above ``max_rank``, ...)."""

    @abstractmethod
    def abort(self, request_id: str, why: str) -> None:
        """End a running request: its stream raises ``RequestEndedError(why)``."""

    @abstractmethod
    async def unload_adapter(self, name: str) -> None: ...

    def adapter_slots(self) -> int | None:
        """Distinct adapters one running batch can hold; ``None``: no limit."""
        return None

    context_length: int | None = None
    """The most tokens a prompt and its answer may hold together; ``None``: not known here."""

    async def tokenize(
        self, request: GenerationRequest, token_strs: bool = False
    ) -> tuple[list[int], list[str] | None]:
        """The prompt's token ids as a generation of ``request`` would see them and, if asked,
        each token's text as logprobs spell it (a part of a character by its bytes)."""
        raise EngineError(f"the {self.backend} engine does not tokenize")

    async def detokenize(self, ids: list[int]) -> str:
        """Token ids (each in the vocabulary, else ``InvalidRequestError``) → text."""
        raise EngineError(f"the {self.backend} engine does not detokenize")

    @abstractmethod
    def stats(self) -> dict:
        """Gauges: ``running`` and ``queued`` requests, ``adapters_loaded``."""

    @abstractmethod
    async def shutdown(self) -> None: ...

    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters():
            raise AdapterNotFoundError(name, self.adapters())

    async def discover_adapter(self, name: str) -> bool:
        """Whether ``name`` is served, after what re-reading the engine can do: an engine over
        HTTP asks its server, where an adapter may have been hot-loaded since."""
        return name in self.adapters()

    async def complete(self, request: GenerationRequest) -> Completion:
        return await collect(self.stream(request), request)

    async def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Run a batch concurrently; the backend batches the rows together."""
        return list(await asyncio.gather(*(self.complete(r) for r in requests)))

    health_probe: asyncio.Future | None = None
    """The one-token probe in flight, which every concurrent ``health`` call awaits."""

    async def health(self) -> dict:
        """Answer a one-token generation on the base model; callers that come while one runs
        share it (a flood of ``/health``, open without the API key, is one probe at a time)."""
        probe = self.health_probe
        if probe is None or probe.done() or probe.get_loop() is not asyncio.get_running_loop():
            probe = self.health_probe = asyncio.ensure_future(self.one_token_probe())
            probe.add_done_callback(lambda done: done.cancelled() or done.exception())  # seen
        return self.health_report(await asyncio.shield(probe))

    async def one_token_probe(self) -> bool:
        probe = GenerationRequest(prompt="Hi", params=SamplingParams(max_tokens=1))
        done = await self.complete(probe)
        return done.usage.completion_tokens == 1

    def health_report(self, ok: bool) -> dict:
        return {
            "ok": ok,
            "backend": self.backend,
            "base_model": self.base_model_id,
            "adapters": self.adapters(),
            **self.stats(),
        }


async def collect(chunks: AsyncIterator[Chunk], request: GenerationRequest) -> Completion:
    """The whole answer of one request from its stream of chunks."""
    parts: list[Chunk] = [chunk async for chunk in chunks]
    last = parts[-1]
    logprobs = [lp for p in parts for lp in p.logprobs or []]
    return Completion(
        text="".join(p.text for p in parts),
        token_ids=[t for p in parts for t in p.token_ids],
        finish_reason=last.finish_reason or "stop",
        usage=last.usage or Usage(0, 0),
        timings=last.timings or Timings(0.0, None, 0.0, None),
        logprobs=logprobs if request.params.logprobs is not None else None,
    )
