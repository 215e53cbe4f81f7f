"""The OpenAI-compatible routes over any engine, with per-adapter Prometheus metrics.

    python app.py                                    # UI + this API on one port (7860)
    python -m engine.api --port 8000                 # the API alone

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming and not), GET /v1/models,
POST /v1/adapters + DELETE /v1/adapters/{name} (admin token when set), GET /health, GET /metrics.
``model`` is an adapter name, the base model id (or ``base``), or SGLang's ``base:adapter`` form.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..interface import (
    AdapterLoadError,
    AdapterNotFoundError,
    Chunk,
    Engine,
    EngineError,
    GenerationRequest,
    SamplingParams,
)
from ..metrics import Metrics, RequestTimer
from ..registry import BASE_MODEL_ALIAS, Registry
from .protocol import (
    DEFAULT_MAX_TOKENS,
    AdapterBody,
    ChatBody,
    CompletionBody,
    OpenAIError,
    SamplingFields,
    engine_error,
    error_response,
    stream_events,
    whole_response,
)


class Api:
    """Translates OpenAI requests into engine requests and back; owns the metrics."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        admin_token: str | None = None,
        adapter_root: str | Path | None = None,
    ):
        self.engine, self.registry = engine, registry
        self.admin_token = admin_token
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self.metrics = Metrics()
        self.created = int(time.time())

    # ----- model names ----------------------------------------------------------------------

    def resolve_model(self, model: str) -> str | None:
        """Model id → adapter name, or None for the base model; unknown ids are a 404."""
        base_ids = {self.engine.base_model_id, BASE_MODEL_ALIAS}
        if model in base_ids:
            return None
        prefix, sep, adapter = model.partition(":")
        name = adapter if sep and prefix in base_ids else model
        if name not in self.engine.adapters():
            raise OpenAIError(
                404,
                f"The model '{model}' does not exist. Available: "
                + ", ".join([self.engine.base_model_id, *self.engine.adapters()]),
                "not_found_error",
                "model",
            )
        return name

    def model_cards(self) -> list[dict]:
        specs = {a.name: a for a in self.registry.adapters}
        base = self.engine.base_model_id
        cards = [{"id": base, "object": "model", "created": self.created, "owned_by": "loraland"}]
        for name in self.engine.adapters():
            spec = specs.get(name)
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "loraland",
                    "parent": base,
                    "root": base,
                    "task": spec.task if spec else "",
                    "category": spec.category if spec else "hot-loaded",
                    "description": spec.description if spec else "",
                    "eval": spec.eval.model_dump() if spec and spec.eval else None,
                }
            )
        return cards

    # ----- requests -------------------------------------------------------------------------

    def sampling(self, body: SamplingFields, adapter: str | None, max_tokens: int | None):
        if body.n != 1:
            raise OpenAIError(
                400, "n > 1 is not supported; send n requests", "invalid_request_error", "n"
            )
        spec = next((a for a in self.registry.adapters if a.name == adapter), None)
        default = spec.generation.max_tokens if spec else DEFAULT_MAX_TOKENS
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(
            max_tokens=max_tokens or default,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            stop=stop,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )

    def completion_request(self, body: CompletionBody) -> GenerationRequest:
        adapter = self.resolve_model(body.model)
        if body.echo or body.logprobs:
            param = "echo" if body.echo else "logprobs"
            raise OpenAIError(400, f"{param} is not supported", "invalid_request_error", param)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise OpenAIError(
                400, "prompt must be one string (batching: send requests concurrently)",
                "invalid_request_error", "prompt",
            )  # fmt: skip
        params = self.sampling(body, adapter, body.max_tokens)
        return GenerationRequest(adapter=adapter, prompt=prompts[0], params=params)

    def chat_request(self, body: ChatBody) -> GenerationRequest:
        adapter = self.resolve_model(body.model)
        if body.logprobs:
            raise OpenAIError(400, "logprobs is not supported", "invalid_request_error", "logprobs")
        params = self.sampling(body, adapter, body.max_completion_tokens or body.max_tokens)
        return GenerationRequest(adapter=adapter, messages=body.messages, params=params)

    async def run(self, request: GenerationRequest, timer: RequestTimer) -> AsyncIterator[Chunk]:
        """Engine stream with metrics; closing it cancels the generation."""
        try:
            async with contextlib.aclosing(self.engine.stream(request)) as chunks:
                async for chunk in chunks:
                    timer.chunk(len(chunk.token_ids))
                    if chunk.finish_reason:
                        timer.finish(chunk.finish_reason, chunk.usage)
                    yield chunk
        except EngineError as err:
            raise engine_error(err) from err

    async def first_chunk(self, chunks: AsyncIterator[Chunk]) -> Chunk:
        """Start the generation before the 200 goes out, so request errors still get a 4xx."""
        return await chunks.__anext__()


def create_api(
    engine: Engine,
    registry: Registry,
    admin_token: str | None = None,
    adapter_root: str | Path | None = None,
    app: FastAPI | None = None,
) -> FastAPI:
    """Add the OpenAI-compatible routes to ``app`` (a new FastAPI app when None)."""
    api = Api(engine, registry, admin_token, adapter_root)
    app = app or FastAPI(title="LoRA Land in a box")
    app.state.api = api

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, err: OpenAIError):
        return error_response(err.status, err.message, err.kind, err.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON", "invalid_request_error")
        api.metrics.error("unknown", "invalid_request_error")
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, "invalid_request_error", param)

    async def serve(body: SamplingFields, build, endpoint: str):
        label = "unknown"  # an unknown model name must not become a label value
        try:
            request = build(body)
            label = request.adapter or "base"
            timer = RequestTimer(api.metrics, label, endpoint)
            chunks = api.run(request, timer)
            first = await api.first_chunk(chunks)
        except OpenAIError as err:
            api.metrics.error(label, err.kind)
            raise
        rid = ("cmpl-" if endpoint == "completions" else "chatcmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            events = stream_events(endpoint, rid, body.model, created, first, chunks, include_usage)
            return StreamingResponse(
                count_stream_errors(events, api.metrics, label), media_type="text/event-stream"
            )
        parts = [first] + [c async for c in chunks]
        return JSONResponse(whole_response(endpoint, rid, body.model, created, parts))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await serve(body, api.completion_request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        return await serve(body, api.chat_request, "chat")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": api.model_cards()}

    def check_admin(request: Request) -> None:
        if api.admin_token and request.headers.get("authorization") != f"Bearer {api.admin_token}":
            raise OpenAIError(401, "admin token required", "authentication_error")

    def allowed_path(raw: str) -> str:
        path = Path(raw)
        if api.adapter_root is None:
            raise OpenAIError(
                403, "hot-loading is off: no adapter root configured", "permission_error"
            )
        if not path.is_absolute():
            path = api.adapter_root / path
        path = path.resolve()
        if not path.is_relative_to(api.adapter_root):
            raise OpenAIError(
                403, f"path must be under the adapter root {api.adapter_root}",
                "permission_error", "path",
            )  # fmt: skip
        return str(path)

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterBody, request: Request):
        check_admin(request)
        try:
            await engine.load_adapter(body.name, allowed_path(body.path))
        except AdapterLoadError as err:
            raise engine_error(err) from err
        return {"loaded": body.name, "adapters": engine.adapters()}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        check_admin(request)
        try:
            await engine.unload_adapter(name)
        except (AdapterNotFoundError, AdapterLoadError) as err:
            raise engine_error(err) from err
        return {"unloaded": name, "adapters": engine.adapters()}

    @app.get("/health")
    async def health():
        try:
            return await engine.health()
        except EngineError as err:
            return error_response(503, f"engine unhealthy: {err}", "server_error")

    @app.get("/metrics")
    async def metrics():
        return Response(api.metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    return app


async def count_stream_errors(events, metrics: Metrics, label: str):
    """A failure after the 200 went out can only be reported in the stream; count it too."""
    try:
        async for event in events:
            yield event
    except OpenAIError as err:
        metrics.error(label, err.kind)
