"""The OpenAI-compatible routes over any engine, with per-adapter Prometheus metrics.

    python app.py                                    # UI + this API on one port (7860)
    python -m engine.api --port 8000                 # the API alone

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming and not), GET /v1/models
(and /v1/models/{id}), POST /v1/adapters + DELETE /v1/adapters/{name} (only with an admin token),
GET /health, GET /metrics; with an API key (``LORALAND_API_KEY``) every /v1 route, the token
routes and /metrics need it, and /health names nothing without it.
``model`` is an adapter name, the base model id (or ``base``), or SGLang's ``base:adapter`` form.
Every failure is a 4xx/5xx in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from ..constraints import grammar_problem
from ..interface import (
    AdapterConflictError,
    AdapterLoadError,
    AdapterNotFoundError,
    Chunk,
    Engine,
    EngineError,
    GenerationRequest,
    SamplingParams,
    Usage,
    clipped,
    new_id,
)
from ..metrics import ABORTED, Metrics, RequestOutcome, RequestTimer
from ..registry import (
    BASE_MODEL_ALIAS,
    FANOUT,
    RESERVED_NAMES,
    SLUG,
    AdapterSpec,
    Registry,
    template_digest,
    template_fields,
)
from ..sampling import resolve
from .hot_path import (
    CancelOnDisconnect,
    EventStream,
    GenerationRoutes,
    HeadAsGet,
    client_left,
    why_fastapi_routes,
)
from .limits import BodyLimit, RefuseWebSockets, bearer_token, guard_v1, shows_details
from .protocol import (
    AdapterBody,
    ChatBody,
    ChunkWriter,
    CompletionBody,
    DetokenizeBody,
    MergeBody,
    OpenAIError,
    SamplingFields,
    TextOffsets,
    TokenizeBody,
    chat_logprobs,
    completion_logprobs,
    from_engine,
    invalid,
    refuse_unsupported,
    usage_dict,
    validation_message,
)
from .tools import ToolPlan, ToolStream, check_tool_results, tool_plan

log = logging.getLogger(__name__)
Merger = Callable[..., Path]
"""``merge_adapters(base_dir, sources, method, weights, density, out, svd_rank, progress=)``."""
GENERATION_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
API_PATHS = {
    "/v1/chat/completions": {"POST"},
    "/v1/completions": {"POST"},
    "/v1/models": {"GET"},
    "/v1/adapters": {"POST"},
    "/v1/adapters/merge": {"POST"},
    "/v1/tokenize": {"POST"},
    "/v1/detokenize": {"POST"},
}
INLINE_LOGPROBS = 2048
"""Log-probability entries a non-streamed answer may hold and be built on the event loop."""
MAX_PROMPTS = 16
MAX_CHOICES = 64
"""At most this many generations per request: models × prompts × n."""


def admin_refusal(token: str | None, authorization: str) -> OpenAIError | None:
    """Why an admin call is refused (admin off: 403; not ``Bearer <token>``: 401), or None;
    the token compared in constant time. The API and the cluster's control API share it."""
    if token is None:
        message = "admin routes are off: start the server with LORALAND_ADMIN_TOKEN set"
        return OpenAIError(403, message, "permission_error")
    given = bearer_token(authorization) or ""
    if not hmac.compare_digest(given.encode("latin-1"), token.strip().encode()):
        return OpenAIError(401, "admin token required", "authentication_error")
    return None


def read_only_route(path: str) -> bool:
    """The API's ``GET`` routes, which answer ``HEAD`` too (``HeadAsGet``)."""
    return path in ("/health", "/metrics", "/v1/models") or path.startswith("/v1/models/")


def error_response(err: OpenAIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def read_json(request: Request) -> dict:
    """The body as a JSON object, or a 400 saying why not (the size limit is ``BodyLimit``'s);
    a 415 for a body declared in another format."""
    headers = request.headers
    refuse_other_formats(headers.get("content-type"), headers.get("content-encoding"))
    refuse_transfer_codings(", ".join(headers.getlist("transfer-encoding")))
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise invalid(f"the body is not UTF-8: {err.reason} at byte {err.start}") from None
    constants: list[str] = []
    try:
        body = json.loads(text, parse_constant=lambda c: constants.append(c) or NotJson(c))
    except RecursionError:
        raise invalid("the body is nested too deeply") from None
    except json.JSONDecodeError as err:
        raise invalid(f"the body is not valid JSON: {err.msg} at {err.pos}") from None
    except ValueError as err:  # e.g. an integer literal of more than 4300 digits
        raise invalid(f"the body cannot be read: {err}") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    if (constants or holds_a_lone_surrogate(text, body)) and (
        found := await asyncio.to_thread(unreadable, body)  # a walk: off the loop
    ):
        where, why = found
        raise invalid(f"{where}: {why}", where)
    return body


def refuse_other_formats(media: str | None, encoding: str | None) -> None:
    """A 415 for a body whose ``Content-Type`` is not JSON (``application/json``,
    ``application/*+json``; none is read as JSON, as FastAPI reads it) or that is compressed. A
    browser sends a ``text/plain`` or form body to another origin without asking first (no CORS
    preflight): read as JSON, any web page could make this server generate."""
    kind = (media or "").partition(";")[0].strip().lower()
    suffixed = kind.startswith("application/") and kind.endswith("+json")
    if kind and kind != "application/json" and not suffixed:
        why = f"Content-Type {clipped(kind)!r} is not JSON: send the body as application/json"
        raise invalid(why, status=415)
    if (encoding or "identity").strip().lower() != "identity":
        why = f"Content-Encoding {clipped(encoding)!r} is not supported: send the body uncompressed"
        raise invalid(why, status=415)


def refuse_transfer_codings(codings: str | None) -> None:
    """A 415 for a body sent in a transfer coding other than ``chunked`` (``gzip, chunked``):
    the HTTP server undoes the chunks only, and the compressed bytes read as "not valid JSON"."""
    other = [c for c in (codings or "").lower().split(",") if c.strip() not in ("", "chunked")]
    if other:
        why = (f"Transfer-Encoding {clipped(codings)!r} is not supported: send the body with "
               "Content-Length, or with Transfer-Encoding: chunked alone")  # fmt: skip
        raise invalid(why, status=415)


class NotJson(str):
    """What Python's parser reads for ``NaN``, ``Infinity`` and ``-Infinity`` here: JSON has no
    such values, and ``unreadable`` names the field that holds one."""


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def holds_a_lone_surrogate(text: str, body) -> bool:
    """Whether some string of the parsed body is not valid Unicode, found at C speed (a walk of
    a megabyte of nested lists held the event loop for a second): only a ``\\uD800``-``\\uDFFF``
    escape can make one, and then the body written out again cannot be encoded."""
    if not SURROGATE_ESCAPE.search(text):
        return False
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def unreadable(body) -> tuple[str, str] | None:
    """The path of the first value no request can hold, and why: a string with an unpaired
    UTF-16 surrogate (JSON allows the escape, no tokenizer can encode it), or a NaN/infinity.
    Walked without recursion; a value's path is spelled only for the one found."""
    parents: list[tuple[object, int]] = [("", -1)]  # (key, parent's index) of each container
    stack: list[tuple[object, int, object]] = [(body, 0, None)]
    while stack:
        value, parent, key = stack.pop()
        if isinstance(value, str):
            if why := string_problem(value):
                return path_of(parents, parent, key) or "body", why
        elif isinstance(value, dict | list):
            parents.append((key, parent))
            here = len(parents) - 1
            items = list(value.items() if isinstance(value, dict) else enumerate(value))
            stack.extend((item, here, k) for k, item in reversed(items))
    return None


def string_problem(value: str) -> str | None:
    if isinstance(value, NotJson):
        return f"{value} is not a JSON value (JSON has no NaN or infinities)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    return None


def path_of(parents: list[tuple[object, int]], parent: int, key) -> str:
    """``messages.0.content`` for the value under ``key`` in container ``parent``."""
    keys = [] if key is None else [key]
    while parent > 0:
        key, parent = parents[parent]
        keys.append(key)
    return ".".join(str(k) for k in reversed(keys) if k is not None)  # None: the body


def parse(model: type[BaseModel], body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as err:
        message, param = validation_message(err.errors())
        raise invalid(message, param) from None


class Api:
    """Translates OpenAI requests into engine requests and back; owns the metrics, the admin
    policy and the shutdown drain."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        admin_token: str | None = None,
        adapter_root: str | Path | None = None,
    ):
        self.engine, self.registry, self.limits = engine, registry, registry.server
        self.admin_token = admin_token or None
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self.metrics = Metrics()
        self.created = int(time.time())
        self.active: dict[str, str | None] = {}
        """request id → adapter of every generation in flight (drain and unload end them)."""
        self.unloading: set[str] = set()
        self.merging: set[str] = set()
        self.loading: dict[str, asyncio.Future] = {}
        self.draining = False
        if self.admin_token is None:
            log.warning("admin routes are off: set LORALAND_ADMIN_TOKEN to hot-load and unload")

    # ----- model names ----------------------------------------------------------------------

    def spec(self, adapter: str | None) -> AdapterSpec | None:
        return next((a for a in self.registry.adapters if a.name == adapter), None)

    @property
    def base_max_tokens(self) -> int:
        """The base model's default ``max_tokens`` (``base.generation``, else the server's)."""
        return resolve(self.registry.base).max_tokens

    def adapter_name(self, model: str) -> str | None:
        """Model id → the adapter it names (None: the base model), served or not."""
        base_ids = {self.engine.base_model_id, BASE_MODEL_ALIAS}
        if model in base_ids:
            return None
        prefix, sep, adapter = model.partition(":")
        return adapter if sep and prefix in base_ids else model

    def served_label(self, raw) -> str:
        """The metrics label of a body's ``model`` before the body is checked: the adapter (or
        ``base``) it names where that is served, else ``unknown`` (never a client's string)."""
        model = raw.get("model") if isinstance(raw, dict) else None
        if not isinstance(model, str):
            return "unknown"
        name = self.adapter_name(model)
        if name is None:
            return BASE_MODEL_ALIAS
        return name if name in self.engine.adapters() else "unknown"

    def resolve_model(self, model: str) -> str | None:
        """Model id → adapter name, or None for the base model; unknown ids are a 404."""
        name = self.adapter_name(model)
        if name is not None and name not in self.engine.adapters():
            available = ", ".join([self.engine.base_model_id, *self.engine.adapters()])
            raise OpenAIError(
                404,
                f"The model '{clipped(model)}' does not exist. Available: {available}",
                "not_found_error",
                "model",
            )
        return name

    async def ensure_model(self, model: str) -> str | None:
        """``resolve_model``, loading the adapter first when ``engine.load_on_demand`` allows and
        it lies under the adapter root; concurrent requests for it share one load, and wait for
        an admin's load of it in flight (if that fails, they load it themselves)."""
        try:
            return self.resolve_model(model)
        except OpenAIError:
            name = self.adapter_name(model)
            if name is not None and await self.engine.discover_adapter(name):
                return name
            path = self.on_demand_path(name)
            waits = self.registry.engine.load_on_demand and name in self.loading
            if path is None and not waits:
                raise
        if (theirs := self.loading.get(name)) is not None:
            with contextlib.suppress(AdapterLoadError):  # an admin's load failed: ours, below
                await asyncio.shield(theirs)
            if path is None or name in self.engine.adapters():
                return self.resolve_model(model)
        loading = self.loading.get(name) or self.shared_load(name, self.load_on_demand(name, path))
        await asyncio.shield(loading)
        return self.resolve_model(model)

    def shared_load(self, name: str, load: Awaitable[None]) -> asyncio.Future:
        """``load`` of ``name`` as the one a request for it waits on meanwhile (``ensure_model``),
        rather than starting its own, which the engine would refuse as a conflict."""
        loading = asyncio.ensure_future(load)
        if name not in self.loading:
            self.loading[name] = loading
            loading.add_done_callback(
                lambda done: self.loading.pop(name) if self.loading.get(name) is done else None
            )
        return loading

    def on_demand_path(self, name: str | None) -> str | None:
        if not (self.registry.engine.load_on_demand and self.adapter_root and name):
            return None
        if not SLUG.match(name) or name in self.unloading or name in self.merging:
            return None
        path = self.adapter_root / name
        return str(path) if (path / "adapter_config.json").is_file() else None

    async def load_on_demand(self, name: str, path: str) -> None:
        t0 = time.perf_counter()
        try:
            await self.engine.load_adapter(name, path, max_rank=self.limits.max_adapter_rank)
        except AdapterLoadError as err:
            if name not in self.engine.adapters():  # not a race with another loader
                raise from_engine(err) from err
        log.info("loaded adapter %s on first use in %.2f s", name, time.perf_counter() - t0)

    def model_cards(self) -> list[dict]:
        base, context = self.engine.base_model_id, self.engine.context_length
        cards = [{"id": base, "object": "model", "created": self.created, "owned_by": "loraland"}]
        cards[0] |= {"root": base, "max_model_len": context}
        for name in self.engine.adapters():
            spec = self.spec(name)
            card = {"id": name, "object": "model", "created": self.created}
            card |= {"owned_by": "loraland", "parent": base, "root": base}
            card["max_model_len"] = context
            cards.append(
                card
                | {
                    "task": spec.task if spec else "",
                    "category": spec.category if spec else "hot-loaded",
                    "description": spec.description if spec else "",
                    "template_fields": template_fields(spec.template) if spec else [],
                    "template_digest": template_digest(spec.template) if spec else None,
                    "eval": spec.eval.model_dump() if spec and spec.eval else None,
                }
            )
        return cards

    # ----- requests -------------------------------------------------------------------------

    def sampling(
        self, body: SamplingFields, spec: AdapterSpec | None, max_tokens, logprobs
    ) -> SamplingParams:
        top_k = None if body.top_k is None else max(body.top_k, 0)
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        try:
            params = resolve(
                spec or self.registry.base,
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=top_k,
                stop=body.stops(),
                seed=body.engine_seed(),
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logit_bias=bias or None,
                min_p=body.min_p,
                repetition_penalty=body.repetition_penalty,
                min_tokens=body.min_tokens,
                logprobs=logprobs,
                response_format=body.response_format,
                ignore_eos=body.ignore_eos or None,
            )
        except EngineError as err:
            raise from_engine(err) from err
        if params.constraint is not None and params.min_tokens:
            raise invalid(
                "min_tokens cannot be combined with structured output or tool calls: the grammar "
                "decides where the answer ends (an adapter's default response_format is lifted "
                "by response_format: {type: text})",
                "min_tokens",
            )
        return params

    async def check_grammar(self, params: SamplingParams, checked: set[str]) -> None:
        """A 400 for a constraint that cannot be served, checked once per request (``checked``:
        the specs passed) and off the event loop: llguidance's check of a large schema takes
        seconds (and releases the interpreter lock)."""
        constraint = params.constraint
        if constraint is None or constraint.spec in checked:
            return
        if problem := await asyncio.to_thread(grammar_problem, constraint):
            raise invalid(f"response_format: {problem}", "response_format")
        checked.add(constraint.spec)

    def copies(self, request: GenerationRequest, n: int) -> list[GenerationRequest]:
        """``n`` generations of one request; with a seed, seed + i for the i-th."""
        out = []
        for i in range(n):
            params = SamplingParams(**vars(request.params))
            if params.seed is not None:
                params.seed = (params.seed + i) % 2**63
            out.append(
                GenerationRequest(
                    adapter=request.adapter,
                    prompt=request.prompt,
                    messages=request.messages,
                    prompt_ids=request.prompt_ids,
                    params=params,
                )
            )
        return out

    async def targets(self, body: SamplingFields) -> list[tuple[str, str | None]]:
        """(model as named, adapter) of each model the request asks for: ``model``, or with the
        fan-out extension each of ``models``."""
        if body.models is None:
            if body.model == FANOUT:
                raise invalid("model 'fanout' needs the models extension: a list", "models")
            return [(body.model, await self.ensure_model(body.model))]
        if body.model != FANOUT:
            raise invalid(f"with models (fan-out), model must be '{FANOUT}'", "model")
        targets = [(m, await self.ensure_model(m)) for m in body.models]
        adapters = [adapter for _, adapter in targets]
        if len(set(adapters)) != len(adapters):
            raise invalid("models: list each model once (base:x and x name one model)", "models")
        return targets

    async def chat_requests(
        self, body: ChatBody, tools: ToolPlan | None = None
    ) -> list[tuple[str, GenerationRequest]]:
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        check_choice_count(body)
        requests, checked = [], set(tools.checked if tools else ())
        for model, adapter in await self.targets(body):
            spec = self.spec(adapter)
            params = self.sampling(body, spec, max_tokens, logprobs)
            await self.check_grammar(params, checked)
            messages = self.chat_messages(body, spec)
            if tools is not None:
                messages = tools.with_instructions(messages)
                params.stop = []  # an adapter's default stop strings would cut the calls
                if max_tokens is None:  # as its default length, sized for its own answers
                    params.max_tokens = max(params.max_tokens, self.base_max_tokens)
            request = GenerationRequest(adapter=adapter, messages=messages, params=params)
            requests += [(model, r) for r in self.copies(request, body.n)]
        return requests

    def chat_messages(self, body: ChatBody | TokenizeBody, spec: AdapterSpec | None) -> list[dict]:
        """The engine's messages, with the adapter's prompt template filled (unless ``raw``)."""
        check_tool_results(body.messages or [])
        messages = [m.as_engine_message() for m in body.messages or []]
        if body.prompt_template == "raw" or spec is None:
            if body.template_fields is not None:
                why = "raw" if spec else "a model without a template"
                raise invalid(f"template_fields cannot be used with {why}", "template_fields")
            if not messages:
                raise invalid("messages: give at least one message", "messages")
            return messages
        fields = template_fields(spec.template)
        if body.template_fields is not None:
            unknown = sorted(set(body.template_fields) - set(fields))
            missing = sorted(set(fields) - set(body.template_fields))
            if unknown or missing:
                raise invalid(
                    f"template_fields: adapter '{spec.name}' takes {fields}"
                    + (f"; unknown {unknown}" if unknown else "")
                    + (f"; missing {missing}" if missing else ""),
                    "template_fields",
                )
            return [*messages, {"role": "user", "content": spec.render(body.template_fields)}]
        if not messages:
            raise invalid("messages: give at least one message (or template_fields)", "messages")
        if messages[-1]["role"] != "user":
            raise invalid(
                "messages: the last message must be the user's (it fills the adapter's "
                "template), or send prompt_template: raw",
                "messages",
            )
        try:
            filled = spec.fill(messages[-1]["content"])
        except ValueError as err:
            hint = " as template_fields, or send prompt_template: raw"
            raise invalid(f"{err}{hint}", "template_fields") from None
        messages[-1] = {**messages[-1], "content": filled}
        return messages

    async def tokenize(self, body: TokenizeBody) -> dict:
        """vLLM's ``/tokenize`` answer for the prompt a generation of ``body`` would see."""
        adapter = await self.ensure_model(body.model or BASE_MODEL_ALIAS)
        if not body.chat():
            request = GenerationRequest(adapter=adapter, prompt=body.prompt)
        else:
            messages = self.chat_messages(body, self.spec(adapter))
            request = GenerationRequest(adapter=adapter, messages=messages)
        try:
            ids, strs = await self.engine.tokenize(request, body.return_token_strs)
        except EngineError as err:
            raise from_engine(err) from err
        context = self.engine.context_length
        return {"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": strs}

    async def detokenize(self, body: DetokenizeBody) -> dict:
        await self.ensure_model(body.model or BASE_MODEL_ALIAS)
        try:
            return {"prompt": await self.engine.detokenize(body.tokens)}
        except EngineError as err:
            raise from_engine(err) from err

    async def completion_requests(
        self, body: CompletionBody
    ) -> list[tuple[str, GenerationRequest]]:
        prompts = completion_prompts(body.prompt)
        if body.echo and body.logprobs is not None:
            raise invalid("echo with logprobs is not supported (no prompt logprobs)", "echo")
        if body.echo and any(isinstance(p, list) for p in prompts):
            raise invalid("echo needs text prompts, not token ids", "echo")
        check_choice_count(body, len(prompts))
        requests, checked = [], set()
        for model, adapter in await self.targets(body):
            params = self.sampling(body, self.spec(adapter), body.max_tokens, body.logprobs)
            await self.check_grammar(params, checked)
            for prompt in prompts:
                as_text = isinstance(prompt, str)
                request = GenerationRequest(
                    adapter=adapter,
                    prompt=prompt if as_text else None,
                    prompt_ids=None if as_text else prompt,
                    params=params,
                )
                requests += [(model, r) for r in self.copies(request, body.n)]
        return requests

    async def run(self, request: GenerationRequest, timer: RequestTimer) -> AsyncIterator[Chunk]:
        """Engine stream with metrics; closing it cancels the generation (counted as finished
        with ``abort``, as vLLM counts it, if no finish came before)."""
        finished = False
        try:
            async with contextlib.aclosing(self.stream(request)) as chunks:
                async for chunk in chunks:
                    timer.chunk(len(chunk.token_ids))
                    if chunk.finish_reason:
                        timer.finish(chunk.finish_reason, chunk.usage)
                        finished = True
                    yield chunk
        except EngineError as err:
            timer.outcome.failed = True
            raise from_engine(err) from err
        except (GeneratorExit, asyncio.CancelledError):
            if not finished and not timer.outcome.failed:
                timer.finish(ABORTED, None)
            raise
        except Exception:
            timer.outcome.failed = True
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """The engine's stream, known to the drain and unload deadlines (the app's tabs use it
        too); closing it cancels the generation."""
        self.active[request.request_id] = request.adapter
        try:
            async with contextlib.aclosing(self.engine.stream(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.active.pop(request.request_id, None)

    def abort(self, adapter: str | None = None, everything: bool = False, why: str = "") -> int:
        """End the generations of ``adapter`` (or all): each stream ends with an error chunk."""
        doomed = [rid for rid, a in self.active.items() if everything or a == adapter]
        for rid in doomed:
            self.engine.abort(rid, why)
        return len(doomed)

    def check_name(self, name: str) -> None:
        """A new adapter's name: a slug, not the base model's, not one being loaded, unloaded or
        merged."""
        if not SLUG.match(name):
            raise invalid(f"name {name!r} must be a slug (a-z, 0-9, -, _)", "name", 422)
        reserved = RESERVED_NAMES | {self.engine.base_model_id: "the base model"}
        if name in reserved:
            raise invalid(f"name {name!r} is reserved for {reserved[name]}", "name", 422)
        if name in self.unloading:
            raise OpenAIError(409, f"adapter '{name}' is being unloaded", "conflict_error", "name")
        if name in self.merging:
            raise OpenAIError(409, f"adapter '{name}' is being merged", "conflict_error", "name")
        if name in self.loading:
            raise OpenAIError(409, f"adapter '{name}' is being loaded", "conflict_error", "name")

    def allowed_path(self, raw: str) -> str:
        """``raw`` (absolute, or relative to the adapter root) resolved; 403 outside the root."""
        if any(ord(c) < 32 for c in raw):
            raise invalid("path: control characters are not allowed", "path")
        if self.adapter_root is None:
            raise OpenAIError(
                403, "hot-loading is off: no adapter root configured", "permission_error"
            )
        path = Path(raw)
        path = (path if path.is_absolute() else self.adapter_root / path).resolve()
        if not path.is_relative_to(self.adapter_root):
            raise OpenAIError(
                403,
                f"path must be under the adapter root {self.adapter_root}",
                "permission_error",
                "path",
            )
        return str(path)

    async def merge(self, body: MergeBody, merger: Merger) -> dict:
        """Served adapters merged into <adapter root>/<name>, then loaded. The name is held
        while it runs; a failed merge leaves no folder behind."""
        self.check_name(body.name)
        out = Path(self.allowed_path(body.name))
        if body.name in self.engine.adapters():
            why = f"'{body.name}' is served already: pick another name"
            raise OpenAIError(409, why, "conflict_error", "name")
        if out.exists():
            why = (f"'{body.name}' exists already as {out} (an unload keeps an adapter's "
                   "files): remove that folder or pick another name")  # fmt: skip
            raise OpenAIError(409, why, "conflict_error", "name")
        unknown = [a for a in body.adapters if a not in self.engine.adapter_paths]
        if unknown:
            raise OpenAIError(404, f"not served: {unknown}", "not_found_error", "adapters")
        sources = {a: self.engine.adapter_paths[a] for a in body.adapters}
        t0 = time.perf_counter()
        self.merging.add(body.name)
        merging = asyncio.ensure_future(asyncio.to_thread(
            merger, self.engine.base_dir, sources, body.method, body.weights, body.density,
            out, body.svd_rank, progress=log.info,
        ))  # fmt: skip
        try:
            await asyncio.shield(merging)
            await self.engine.load_adapter(body.name, str(out), self.limits.max_adapter_rank)
        except BaseException as err:
            with contextlib.suppress(BaseException):  # a thread cannot be stopped: let it end
                await merging
            shutil.rmtree(out, ignore_errors=True)
            if isinstance(err, AdapterConflictError):  # the name was taken meanwhile: a 409
                raise from_engine(err) from err
            if isinstance(err, ValueError | AdapterLoadError):
                raise invalid(f"cannot merge: {err}", "adapters", 422) from err
            raise
        finally:
            self.merging.discard(body.name)
        manifest = json.loads((out / "merge.json").read_text())
        return {
            "merged": body.name,
            "seconds": round(time.perf_counter() - t0, 1),
            "merge": manifest,
            "adapters": self.engine.adapters(),
        }

    def admin_allows(self, authorization: str) -> bool:
        """Admin is on (a token is set) and ``authorization`` is ``Bearer <token>``."""
        return admin_refusal(self.admin_token, authorization) is None

    # ----- shutdown -------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests; end the streams still running after the deadline."""
        if self.draining:
            return
        self.draining = True
        deadline = self.limits.drain_seconds
        log.warning("shutting down: %d streams may run %.0f s more", len(self.active), deadline)
        asyncio.get_running_loop().call_later(deadline, self.end_streams)

    def end_streams(self) -> None:
        ended = self.abort(everything=True, why="the server is shutting down")
        if ended:
            log.warning("drain deadline: ended %d streams with an error chunk", ended)

    def refuse_while_draining(self) -> None:
        if self.draining:
            raise OpenAIError(503, "the server is shutting down", "server_error")


def check_choice_count(body: SamplingFields, prompts: int = 1) -> None:
    """At most ``MAX_CHOICES`` generations (models × prompts × n), checked before any adapter is
    loaded on first use; the error names the field that multiplies."""
    models = len(body.models) if body.models else 1
    count = models * prompts * body.n
    if count > MAX_CHOICES:
        param = "n" if body.n > 1 else "models" if models > 1 else "prompt"
        raise invalid(
            f"{count} generations asked (models {models} × prompts {prompts} × n {body.n}); "
            f"at most {MAX_CHOICES}",
            param,
        )


def completion_prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt or len(prompt) > MAX_PROMPTS:
        raise invalid(f"prompt: give 1 to {MAX_PROMPTS} prompts", "prompt")
    return list(prompt)


# ----- the app ----------------------------------------------------------------------------------


def create_api(
    engine: Engine,
    registry: Registry,
    admin_token: str | None = None,
    adapter_root: str | Path | None = None,
    app: FastAPI | None = None,
    merger: Merger | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """Add the OpenAI-compatible routes to ``app`` (a new FastAPI app when None). Call it
    before mounting anything at ``/``: its catch-all keeps ``/v1/...`` answers in OpenAI's
    shape. With a ``merger`` (``finetune.merge.merge_adapters``, which ``python app.py``
    passes), ``POST /v1/adapters/merge`` combines served adapters. The generation routes skip
    FastAPI (``hot_path``) unless a given ``app`` has middleware, dependencies, exception
    handlers or routes of its own there. With an ``api_key`` every ``/v1`` route of ``app``
    needs it (``limits.ApiKey``)."""
    api = Api(engine, registry, admin_token, adapter_root)
    given, app = app, app or FastAPI(title="LoRA Land in a box")
    through_fastapi = given and why_fastapi_routes(given, GENERATION_ROUTES)
    app.router.redirect_slashes = False
    app.state.api = api

    def counted(err: OpenAIError, headers: dict | None = None) -> JSONResponse:
        """An error outside a generation request (admin, routes), counted under ``none``."""
        api.metrics.error("none", err.kind, err.status)
        return error_response(err, headers)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, err: OpenAIError):
        return error_response(err) if err.counted else counted(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {err.detail}"
        if request.method == "PRI":  # HTTP/2's preface, which sglang-router tries first
            return error_response(OpenAIError(err.status_code, message, kind), err.headers)
        return counted(OpenAIError(err.status_code, message, kind), err.headers)

    async def serve(request: Request, endpoint: str):
        """A generation request's answer; an OpenAI error as its error response."""
        watch = CancelOnDisconnect(request.receive)  # the request's one disconnect watcher
        try:
            answer = await generate(request, endpoint, watch)
        except OpenAIError as err:
            answer = error_response(err) if err.counted else counted(err)
        except BaseException:
            watch.close()
            raise
        if not isinstance(answer, EventStream):  # a stream closes it at its end
            watch.close()
        return answer

    async def generate(request: Request, endpoint: str, watch: CancelOnDisconnect):
        model = CompletionBody if endpoint == "completions" else ChatBody
        label = "unknown"  # an unknown model name must not become a label value
        try:
            api.refuse_while_draining()
            raw = await read_json(request)
            label = api.served_label(raw)
            refuse_unsupported(raw)
            body = parse(model, raw)
            # not cancelled halfway: it may load an adapter
            if endpoint == "chat":
                tools = tool_plan(body)
                if tools is not None:
                    await tools.check_grammar()
                named = await api.chat_requests(body, tools)
            else:
                tools, named = None, await api.completion_requests(body)
            requests = [r for _, r in named]
            group = new_id()
            for r in requests:
                r.group = group
            label = requests[0].adapter or BASE_MODEL_ALIAS
            outcome = RequestOutcome()
            streams = [
                api.run(
                    r, RequestTimer(api.metrics, r.adapter or BASE_MODEL_ALIAS, endpoint, outcome)
                )
                for r in requests
            ]
            async with watch:  # the body is read
                firsts = await first_chunks(streams)
            if watch.left:
                return client_left()
        except OpenAIError as err:
            api.metrics.error(label, err.kind, err.status)
            err.counted = True
            raise
        rid = ("cmpl-" if endpoint == "completions" else "chatcmpl-") + new_id()
        choice_models = [m for m, _ in named]
        include_usage = bool(
            body.stream and body.stream_options and body.stream_options.include_usage
        )
        writer = ChunkWriter(
            endpoint, rid, body.model, int(time.time()), choice_models, include_usage
        )
        echo = [r.prompt or "" for r in requests] if getattr(body, "echo", False) else None
        if body.stream:

            def count(err: OpenAIError) -> None:  # a failure after the 200 is counted too
                api.metrics.error(label, err.kind, err.status)

            return EventStream(
                stream_events(writer, firsts, streams, include_usage, echo, body.n, count, tools),
                watch,
            )
        async with watch:
            parts = await collect(firsts, streams)
        if watch.left:
            return client_left()
        fanout = body.models is not None
        if sum(len(c.logprobs or ()) for chunks in parts for c in chunks) <= INLINE_LOGPROBS:
            return JSONResponse(whole_response(writer, parts, echo, fanout, body.n, tools))
        # off the loop: 16,000 tokens' top-20 logprobs took 1.8 s to build and write out
        answer = await asyncio.to_thread(
            lambda: JSONResponse(whole_response(writer, parts, echo, fanout, body.n, tools))
        )
        return answer

    @app.post("/v1/completions")  # served by GenerationRoutes; listed here for the OpenAPI page
    async def completions(request: Request):
        return await serve(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, "chat")

    app.add_middleware(HeadAsGet, is_read_only=read_only_route)  # inside: generation skips it
    app.add_middleware(RefuseWebSockets, router=app.router, metrics=api.metrics)
    if through_fastapi:
        log.info("the generation routes go through FastAPI: %s", through_fastapi)
    else:
        app.add_middleware(GenerationRoutes, routes=GENERATION_ROUTES, serve=serve)
    app.add_middleware(BodyLimit, max_bytes=registry.server.max_body_bytes, metrics=api.metrics)
    open_metrics = registry.server.open_metrics
    guard_v1(app, api_key, api.admin_token, api.metrics, open_metrics)  # a refusal reads no body
    if registry.server.cors_origins:  # outermost: a preflight is answered before any limit
        app.add_middleware(
            CORSMiddleware,
            allow_origins=registry.server.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            max_age=600,
        )

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": api.model_cards()}

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str):
        adapter = api.resolve_model(model)  # the 404 with the list of models
        wanted = engine.base_model_id if adapter is None else adapter
        return next(c for c in api.model_cards() if c["id"] == wanted)

    def check_admin(request: Request) -> None:
        if refused := admin_refusal(api.admin_token, request.headers.get("authorization", "")):
            raise refused

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        check_admin(request)
        body = parse(AdapterBody, await read_json(request))
        api.check_name(body.name)
        path = api.allowed_path(body.path)
        load = engine.load_adapter(body.name, path, max_rank=api.limits.max_adapter_rank)
        try:  # shielded, as the requests waiting on it shield it: one waiter cancelled (at
            # shutdown) does not cancel the load for the others
            await asyncio.shield(api.shared_load(body.name, load))
        except AdapterLoadError as err:
            raise from_engine(err) from err
        log.info("hot-loaded adapter %s from %s", body.name, path)
        return {"loaded": body.name, "adapters": engine.adapters()}

    @app.post("/v1/adapters/merge")
    async def merge_adapters(request: Request):
        check_admin(request)
        if merger is None:
            raise OpenAIError(404, "merging is served by python app.py", "not_found_error")
        return await api.merge(parse(MergeBody, await read_json(request)), merger)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        check_admin(request)
        if name in api.unloading:
            raise OpenAIError(409, f"adapter '{name}' is being unloaded", "conflict_error")
        try:
            await engine.discover_adapter(name)
            engine.check_adapter(name)
        except AdapterNotFoundError as err:
            raise from_engine(err) from err
        api.unloading.add(name)
        try:
            unloading = asyncio.ensure_future(engine.unload_adapter(name))
            done, _ = await asyncio.wait({unloading}, timeout=api.limits.unload_seconds)
            ended = 0 if done else api.abort(name, why=f"adapter '{name}' was unloaded")
            await unloading
        except (AdapterNotFoundError, AdapterLoadError) as err:
            raise from_engine(err) from err
        finally:
            api.unloading.discard(name)
        return {"unloaded": name, "streams_ended": ended, "adapters": engine.adapters()}

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request):
        return await api.tokenize(parse(TokenizeBody, await read_json(request)))

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: Request):
        return await api.detokenize(parse(DetokenizeBody, await read_json(request)))

    @app.get("/health")
    async def health(request: Request):
        if api.draining:
            return error_response(OpenAIError(503, "shutting down", "server_error"))
        details = shows_details(request.scope, api_key)
        try:
            report = await engine.health()
        except EngineError as err:
            why = f"engine unhealthy: {err}" if details else "engine unhealthy"
            return error_response(OpenAIError(503, why, "server_error"))
        return report if details else {"ok": report["ok"]}

    @app.get("/metrics")
    async def metrics():
        text = api.metrics.render(engine.stats())
        return Response(text, media_type="text/plain; version=0.0.4")

    async def model_info():
        """SGLang's worker routes, which sglang-router reads when it registers a replica (it
        tries each of these paths: answering them all keeps 404s out of ``/metrics``)."""
        base = engine.base_model_id
        return {"model_path": base, "served_model_name": base, "is_generation": True}

    for path in ("/get_model_info", "/model_info", "/get_server_info", "/server_info"):
        app.add_api_route(path, model_info, methods=["GET"])

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def no_such_route(request: Request, rest: str):
        path = request.url.path
        named = path.startswith("/v1/adapters/") and path != "/v1/adapters/"
        allowed = API_PATHS.get(path) or ({"DELETE"} if named else None)
        if allowed and request.method not in allowed:
            err = OpenAIError(405, f"{request.method} {path}: use {', '.join(sorted(allowed))}",
                              "invalid_request_error")  # fmt: skip
            return counted(err, {"allow": ", ".join(sorted(allowed))})
        return counted(OpenAIError(404, f"no route {path}", "not_found_error"))

    return app


# ----- responses --------------------------------------------------------------------------------


async def all_or_nothing(coroutines) -> list:
    """Every result, or (on the first failure, or when cancelled) every other one cancelled
    and awaited before the failure is raised: no generator is left running."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def first_chunks(streams: list[AsyncIterator[Chunk]]) -> list[Chunk]:
    """Start every generation before the 200 goes out, so request errors still get a 4xx. One
    stream (the hot path) is awaited in the request's own task: no task to start, no turn of the
    loop before the engine sees the request."""
    try:
        if len(streams) == 1:
            return [await anext(streams[0])]
        return await all_or_nothing(anext(s) for s in streams)
    except BaseException:
        for s in streams:
            await s.aclose()
        raise


async def collect(firsts: list[Chunk], streams) -> list[list[Chunk]]:
    async def rest(first, stream):
        return [first] + [c async for c in stream]

    try:
        return await all_or_nothing(rest(f, s) for f, s in zip(firsts, streams))
    finally:
        for s in streams:
            await s.aclose()


def whole_response(
    writer: ChunkWriter,
    parts: list[list[Chunk]],
    echo,
    fanout: bool,
    n: int,
    tools: ToolPlan | None = None,
) -> dict:
    """The non-streamed answer; usage counts each prompt once, not once per copy (``n``)."""
    choices, usage = [], Usage(0, 0)
    for index, chunks in enumerate(parts):
        last = chunks[-1]
        text = "".join(c.text for c in chunks)
        with_logprobs = last.logprobs is not None
        logprobs = [lp for c in chunks for lp in c.logprobs or []] if with_logprobs else None
        finish = last.finish_reason
        if writer.endpoint == "chat":
            message = {"role": "assistant", "content": text, "refusal": None}
            if tools is not None:
                message, finish = tools.message(text, finish)
            choice = {"message": message}
            choice["logprobs"] = chat_logprobs(logprobs) if logprobs is not None else None
        else:
            prefix = echo[index] if echo else ""
            choice = {"text": prefix + text}
            choice["logprobs"] = completion_logprobs(logprobs) if logprobs is not None else None
        tag = {"model": writer.choice_models[index]} if fanout else {}
        choices.append({"index": index, **tag, **choice, "finish_reason": finish})
        usage = Usage(
            usage.prompt_tokens + (last.usage.prompt_tokens if index % n == 0 else 0),
            usage.completion_tokens + last.usage.completion_tokens,
        )
    kind = "chat.completion" if writer.endpoint == "chat" else "text_completion"
    return {**writer.head, "object": kind, "choices": choices, "usage": usage_dict(usage)}


def encoded(writer: ChunkWriter, index: int, chunk: Chunk, offsets: TextOffsets) -> bytes | None:
    """One chunk's event; ``offsets``: this choice's, moved on by the chunk (a completion's
    ``text_offset`` counts from the start of the choice's text)."""
    if chunk.logprobs is None:
        offsets.skip(chunk.text)
    if chunk.logprobs is not None or chunk.finish_reason:
        logprobs = None
        if writer.endpoint == "chat" and chunk.logprobs is not None:
            logprobs = chat_logprobs(chunk.logprobs)
        elif chunk.logprobs is not None:
            logprobs = completion_logprobs(chunk.logprobs, offsets)
        return writer.choice(index, chunk.text, chunk.finish_reason, logprobs)
    return writer.text(index, chunk.text) if chunk.text else None


async def stream_events(
    writer, firsts, streams, include_usage: bool, echo, n: int, on_failure, tools=None
):
    """SSE events: the role (chat), every choice's deltas (with ``tools``, tool-call deltas),
    usage (each prompt once, not once per copy), ``[DONE]``. A failure after the 200 ends this
    stream with an error event and ``[DONE]`` and is handed to ``on_failure`` (to be counted);
    other streams never see it."""
    prompt_tokens = completion_tokens = 0
    offsets = [TextOffsets(len(echo[i]) if echo else 0) for i in range(len(streams))]
    calls = [ToolStream(tools) for _ in streams] if tools is not None else None
    failure = None
    try:
        for index in range(len(streams)):
            if writer.endpoint == "chat":
                yield writer.role(index, "" if calls is None else None)
            elif echo:
                yield writer.text(index, echo[index])
        async with contextlib.aclosing(merged(firsts, streams)) as chunks:
            async for index, chunk in chunks:
                if calls is not None:
                    for event in tool_events(writer, index, chunk, calls[index]):
                        yield event
                elif event := encoded(writer, index, chunk, offsets[index]):
                    yield event
                if chunk.usage:
                    prompt_tokens += chunk.usage.prompt_tokens if index % n == 0 else 0
                    completion_tokens += chunk.usage.completion_tokens
        if include_usage:
            yield writer.usage(Usage(prompt_tokens, completion_tokens))
    except OpenAIError as err:
        failure = err
    finally:
        for s in streams:
            await s.aclose()
    if failure is not None:
        on_failure(failure)
        yield writer.error(failure)
    yield writer.done()


def tool_events(writer: ChunkWriter, index: int, chunk: Chunk, calls: ToolStream) -> list[bytes]:
    """One chunk's events in a tool-call answer: its call deltas, the logprobs of the tokens
    they carry on the last of them (those of text held back go with it), the finish reason on
    the chunk that finishes; while everything is held back, nothing, or a keep-alive comment."""
    deltas = calls.deltas(chunk)
    entries = calls.logprobs_to_send(chunk, sending=bool(deltas))
    logprobs = chat_logprobs(entries) if entries is not None else None
    if chunk.finish_reason:
        deltas = deltas or [{}]
    if comment := calls.keepalive(sending=bool(deltas)):
        return [comment]
    events = []
    for i, delta in enumerate(deltas):
        last = i == len(deltas) - 1
        finish = calls.finish_reason(chunk.finish_reason) if last else None
        choice = {"index": index, "delta": delta, "logprobs": logprobs if last else None}
        events.append(writer.payload(index, choices=[choice | {"finish_reason": finish}]))
    return events


async def merged(firsts, streams) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from every stream; one stream is read directly (the hot path)."""
    if len(streams) == 1:
        yield 0, firsts[0]
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int):
        try:
            await queue.put((index, firsts[index]))
            async for chunk in streams[index]:
                await queue.put((index, chunk))
        except OpenAIError as err:
            await queue.put((index, err))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, OpenAIError):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
