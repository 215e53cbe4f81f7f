"""An ``Engine`` over HTTP: a running ``python -m engine.api``, or a cluster (``python -m
engine.cluster``: sglang-router for generations, the control API for models, metrics and admin).

    engine = RemoteEngine("http://127.0.0.1:8000", registry)   # what `python app.py --remote` uses

Which one answers at the URL is probed once: sglang-router answers ``GET /readiness`` with its
worker counts, ``python -m engine.api`` answers ``GET /get_model_info``. A cluster's control API
is the router's port + 1 unless ``control_url`` names it.

Every request means on the server what it means to an embedded engine: ``stream`` generates from
exactly the messages it is given (the adapter's template already filled, as the app fills it).
One exception: a default ``max_tokens`` that a long prompt leaves no room for is fitted by an
embedded engine and refused by the server (it is sent as a value; only the server counts).

- One server: chat requests carry ``prompt_template: "raw"``, so the server fills nothing.
- Behind sglang-router, which drops that field, the server always fills an adapter's template
  with the last user message. So that message is sent *unfilled*: the value that the template,
  filled with it, gives back exactly the message (checked). What cannot be sent that way is an
  error before anything is sent, never a different answer: a template of several fields, a last
  message that is not the template filled, token-id prompts, regex/choice constraints.
- Every sampling field is sent explicitly (``response_format: {"type": "text"}`` included), so
  the server's per-adapter defaults never replace the caller's resolved ones.
- The templates come from the local adapters.yaml; where the server fills a template with other
  fields than the local one (or one the local file does not have), requests to that adapter are
  refused: start the app with the server's adapters.yaml.

Token ids do not cross the OpenAI wire: a chunk's ``token_ids`` holds one ``-1`` per token (the
count is exact once the last chunk is in). Timings are measured here, as the caller sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import string
import weakref
from collections.abc import AsyncIterator

import httpx
from pydantic import BaseModel

from .api.limits import bearer
from .cluster import ROUTING_HEADER
from .interface import (
    AdapterLoadError,
    AdapterNotFoundError,
    Chunk,
    Engine,
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    RequestClock,
    RequestEndedError,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from .registry import (
    BASE_MODEL_ALIAS,
    AdapterSpec,
    Registry,
    template_digest,
    template_fields,
)

NO_TOKEN_ID = -1
"""What ``Chunk.token_ids`` holds for each token: ids are not sent over HTTP."""
CONNECT_S = 10.0
READ_S = 600.0
"""A generation may wait in the server's queue; a hot-load may take minutes."""


class RemoteSettings(BaseModel):
    """Where the remote engine sends what (``Engine.settings``)."""

    url: str
    """Generations: the router of a cluster, or the one server."""
    control_url: str
    """Models, metrics, health and admin: the cluster's control API, or the one server."""
    cluster: bool
    """Behind sglang-router (which drops this API's extension fields)."""


class RemoteError(EngineError):
    """The server answered with an error no narrower ``EngineError`` describes; its HTTP status
    and error type are kept (the app's own API passes them on)."""

    def __init__(self, message: str, status: int = 502, kind: str = "server_error"):
        super().__init__(message)
        self.status_code, self.error_type = status, kind


class AdminRefusedError(AdapterLoadError):
    """The server refused a hot-load or unload (no or a wrong admin token, admin off, a path
    outside its adapter root, a name taken, ...); its status and error type are kept."""

    def __init__(self, message: str, status: int, kind: str, param: str | None = None):
        super().__init__(message)
        self.status_code, self.error_type, self.param = status, kind, param


class RemoteEngine(Engine):
    backend = "remote"

    def __init__(
        self,
        url: str,
        registry: Registry,
        control_url: str | None = None,
        admin_token: str | None = None,
        api_key: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.registry = registry
        self.admin_token = admin_token or None
        self.key_header = bearer(api_key)
        """Sent on every request (``LORALAND_API_KEY``); an admin call sends the admin token."""
        self.cluster = is_router(self.url)
        self.control_url = (control_url or default_control(self.url, self.cluster)).rstrip("/")
        self.settings = RemoteSettings(
            url=self.url, control_url=self.control_url, cluster=self.cluster
        )
        self.cards: dict[str, dict] = {}
        self.base_model_id = ""
        self.use_listing(get_json(f"{self.control_url}/v1/models", self.key_header))
        if self.cluster:
            check_same_base(self.url, self.base_model_id, self.key_header)
        self.base_dir = self.base_model_id
        """Not a local directory: the base lives on the server."""
        where = "a cluster behind sglang-router" if self.cluster else "an API server"
        self.device = f"{where} at {self.url}"
        self.clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.running: set[str] = set()
        self.aborted: dict[str, str] = {}

    # ----- models ---------------------------------------------------------------------------

    def use_listing(self, listing: dict) -> None:
        """``GET /v1/models`` → the base id and every adapter's card."""
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list) or not all(isinstance(c, dict) and "id" in c for c in data):
            raise RemoteError(f"{self.control_url}/v1/models is not an OpenAI model list")
        base = next((card for card in data if "parent" not in card), None)
        if base is None:
            raise RemoteError(f"{self.control_url}/v1/models lists no base model")
        self.base_model_id, self.base_card = base["id"], base
        self.cards = {card["id"]: card for card in data if "parent" in card}
        self.adapter_paths = {
            spec.name: str(spec.path) for spec in self.registry.adapters if spec.name in self.cards
        }

    def adapters(self) -> list[str]:
        return list(self.cards)

    def card(self, name: str) -> dict | None:
        """The server's ``/v1/models`` card of an adapter (task, category, eval, ...)."""
        return self.cards.get(name)

    async def refresh(self) -> None:
        """Read the served adapters again (after a hot-load, or a name not seen yet)."""
        self.use_listing(await self.get_json(f"{self.control_url}/v1/models"))

    def local_spec(self, name: str | None) -> AdapterSpec | None:
        return next((s for s in self.registry.adapters if s.name == name), None)

    def served_fields(self, adapter: str | None) -> list[str]:
        """The fields of the template the server fills for this adapter ([]: none)."""
        card = self.cards.get(adapter) if adapter else None
        return list(card.get("template_fields") or []) if card else []

    def check_template(self, adapter: str | None) -> None:
        """The server's template for the adapter is the local one (the same fields and, where
        the server says, the same text), or it has none."""
        served = self.served_fields(adapter)
        spec = self.local_spec(adapter)
        local = template_fields(spec.template) if spec else []
        if served and served != local:
            raise InvalidRequestError(
                f"adapter '{adapter}': the server fills a prompt template of fields {served}, "
                f"the local adapters.yaml {'one of ' + str(local) if spec else 'has none'}: "
                "start the app with the server's adapters.yaml",
                "model",
            )
        digest = (self.cards.get(adapter) or {}).get("template_digest") if adapter else None
        if spec and digest and digest != template_digest(spec.template):
            raise InvalidRequestError(
                f"adapter '{adapter}': the server's prompt template is worded otherwise than the "
                "local adapters.yaml's, so the app and the server would answer differently: "
                "start the app with the server's adapters.yaml",
                "model",
            )

    # ----- requests -------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        request.validate()
        await self.ensure_served(request.adapter)
        self.check_template(request.adapter)
        path, body = self.request_body(request)
        keyed = self.cluster and request.adapter  # the base's requests spread over every replica
        headers = {ROUTING_HEADER: request.adapter} if keyed else {}
        rid, clock = request.request_id, RequestClock()  # from the send: TTFT as the caller sees it
        self.running.add(rid)
        try:
            async with self.client().stream(
                "POST", self.url + path, json=body, headers=headers
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise await self.generation_error(response, request.adapter)
                async for chunk in self.chunks(response, request, path, clock):
                    yield chunk
        except httpx.HTTPError as err:
            raise RemoteError(f"{self.url}: {type(err).__name__}: {err}") from err
        finally:
            self.running.discard(rid)
            self.aborted.pop(rid, None)

    async def discover_adapter(self, name: str) -> bool:
        if name not in self.cards:
            await self.refresh()
        return name in self.cards

    async def ensure_served(self, adapter: str | None) -> None:
        """An adapter not seen yet may have been hot-loaded since: ask once, then refuse."""
        if adapter is not None and adapter not in self.cards:
            await self.refresh()
        self.check_adapter(adapter)

    def request_body(self, request: GenerationRequest) -> tuple[str, dict]:
        """The route and the JSON body that mean this request on the server."""
        model = request.adapter or BASE_MODEL_ALIAS
        head = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
        if request.messages is not None:
            body = head | chat_sampling(request.params, self.cluster)
            body["messages"] = self.messages_for(request.adapter, request.messages)
            if not self.cluster:
                body["prompt_template"] = "raw"
            return "/v1/chat/completions", body
        if request.prompt_ids is not None and self.cluster:
            raise InvalidRequestError(
                "token-id prompts cannot go through sglang-router (its 422): send text, or use "
                "one server's URL",
                "prompt",
            )
        prompt = request.prompt if request.prompt is not None else request.prompt_ids
        body = head | completion_sampling(request.params, self.cluster)
        return "/v1/completions", body | {"prompt": prompt}

    def messages_for(self, adapter: str | None, messages: list[dict]) -> list[dict]:
        """The messages to send: as they are, except behind the router, where the last one goes
        unfilled for the server to fill with the adapter's template."""
        fields = self.served_fields(adapter)
        if not self.cluster or not fields:
            return messages
        spec = self.local_spec(adapter)
        if len(fields) != 1:
            raise InvalidRequestError(
                f"adapter '{adapter}' has a template of several fields {fields}: sglang-router "
                "drops the template_fields extension that carries them, so it cannot be asked "
                "through a cluster; use one server's URL (a replica's) instead",
                "model",
            )
        last = messages[-1]
        value = unfilled(spec, last["content"]) if last["role"] == "user" else None
        if value is None:
            raise InvalidRequestError(
                f"behind sglang-router the server fills adapter '{adapter}'s template with the "
                "last user message, and this request's last message is not that template "
                "filled: it cannot be sent unchanged (prompt_template: raw is dropped by the "
                "router); use one server's URL instead",
                "messages",
            )
        return [*messages[:-1], {**last, "content": value}]

    async def chunks(
        self, response: httpx.Response, request: GenerationRequest, path: str, clock: RequestClock
    ) -> AsyncIterator[Chunk]:
        """SSE events → ``Chunk``s; the finishing event is held until the usage event."""
        counted = 0
        final: Chunk | None = None
        usage: Usage | None = None
        chat = path.endswith("chat/completions")
        async for event in sse_events(response):
            if why := self.aborted.get(request.request_id):
                raise RequestEndedError(why)
            if "error" in event:
                raise stream_error(event["error"])
            if event.get("usage") and not event.get("choices"):
                usage = Usage(event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
                continue
            chunk = parse_choice(event["choices"][0], chat)
            if chunk.text or chunk.logprobs:
                clock.token()
            if chunk.finish_reason:
                final = chunk
            elif chunk.text or chunk.logprobs:
                chunk.token_ids = [NO_TOKEN_ID] * token_count(chunk)
                counted += len(chunk.token_ids)
                yield chunk
        if final is None:
            raise RequestEndedError(f"{self.url} ended the stream before the answer finished")
        yield finished(final, usage, counted, clock)

    async def generation_error(self, response: httpx.Response, adapter: str | None) -> EngineError:
        status, error = error_of(response)
        if status == 404 and error.get("param") == "model" and adapter is not None:
            await self.refresh()
            return AdapterNotFoundError(adapter, self.adapters())
        return engine_error(status, error)

    def abort(self, request_id: str, why: str) -> None:
        """The stream ends with ``RequestEndedError(why)`` at its next event (the server's
        generation is cancelled when the stream's connection closes)."""
        if request_id in self.running:
            self.aborted[request_id] = why or "the request was ended"

    # ----- tokens ---------------------------------------------------------------------------

    @property
    def context_length(self) -> int | None:
        """The server's (``max_model_len`` of its model cards)."""
        return self.base_card.get("max_model_len")

    async def tokenize(
        self, request: GenerationRequest, token_strs: bool = False
    ) -> tuple[list[int], list[str] | None]:
        """The server's ``/tokenize`` (a cluster's control API asks a replica): the messages go
        as filled here, as a generation's do."""
        request.validate()
        await self.ensure_served(request.adapter)
        body: dict = {"model": request.adapter or BASE_MODEL_ALIAS, "return_token_strs": token_strs}
        if request.messages is not None:
            body |= {"messages": request.messages, "prompt_template": "raw"}
        else:
            body["prompt"] = request.prompt
        answer = await self.post_json("/tokenize", body)
        return answer["tokens"], answer.get("token_strs")

    async def detokenize(self, ids: list[int]) -> str:
        return (await self.post_json("/detokenize", {"tokens": ids}))["prompt"]

    async def post_json(self, path: str, body: dict) -> dict:
        """A POST to the control API that must answer 200 with JSON; a refusal keeps its status."""
        return await self.get_json(self.control_url + path, body)

    # ----- admin, health, metrics -----------------------------------------------------------

    async def load_adapter(self, name: str, path: str, max_rank: int | None = None) -> None:
        """Hot-load on the server (every replica or none); ``path`` is read there, under its
        adapter root; its own ``server.max_adapter_rank`` applies, not ``max_rank``."""
        await self.admin("POST", "/v1/adapters", {"name": name, "path": path})
        await self.refresh()

    async def unload_adapter(self, name: str) -> None:
        if name not in self.cards:
            await self.refresh()
        self.check_adapter(name)
        await self.admin("DELETE", f"/v1/adapters/{name}", None)
        await self.refresh()

    async def admin(self, method: str, path: str, body: dict | None) -> dict:
        """An admin call to the control API with the admin token; a refusal keeps its status."""
        auth = bearer(self.admin_token)
        try:
            answer = await self.client().request(
                method, self.control_url + path, json=body, headers=auth
            )
        except httpx.HTTPError as err:
            raise RemoteError(f"{self.control_url}: {type(err).__name__}: {err}") from err
        if answer.status_code == 200:
            return answer.json()
        status, error = error_of(answer)
        message = error.get("message") or answer.text[:300]
        kind = error.get("type") or "server_error"
        raise AdminRefusedError(message, status, kind, error.get("param"))

    async def health(self) -> dict:
        """The server's own ``/health`` (a cluster's: every replica's) and, on a cluster, the
        router's ``/readiness`` (generations go through it), with this engine's view."""
        report = {
            "server": self.url,
            "server_health": await self.get_json(f"{self.control_url}/health"),
        }
        if self.cluster:
            report["router_readiness"] = await self.get_json(f"{self.url}/readiness")
        return self.health_report(True) | report

    def stats(self) -> dict:
        """This client's view: its streams in flight; the queue is the server's (0 here)."""
        return {"running": len(self.running), "queued": 0, "adapters_loaded": len(self.cards)}

    async def shutdown(self) -> None:
        client = self.clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    # ----- HTTP -----------------------------------------------------------------------------

    def client(self) -> httpx.AsyncClient:
        """One connection pool per event loop (the app's, a test's ``asyncio.run``)."""
        loop = asyncio.get_running_loop()
        if loop not in self.clients:
            timeout = httpx.Timeout(READ_S, connect=CONNECT_S)
            self.clients[loop] = httpx.AsyncClient(timeout=timeout, headers=self.key_header)
        return self.clients[loop]

    async def get_json(self, url: str, post: dict | None = None) -> dict:
        """A GET (or a POST of ``post``) that must answer 200 with JSON; anything else is an
        ``EngineError``, a refusal with its status."""
        try:
            if post is None:
                answer = await self.client().get(url)
            else:
                answer = await self.client().post(url, json=post)
        except httpx.HTTPError as err:
            raise RemoteError(f"{url}: {type(err).__name__}: {err}") from err
        if answer.status_code != 200:
            raise engine_error(*error_of(answer))
        try:
            return answer.json()
        except ValueError:
            raise RemoteError(f"{url} answered what is not JSON: {answer.text[:300]!r}") from None


# ----- what answers at the URL ------------------------------------------------------------------


def is_router(url: str) -> bool:
    """sglang-router answers ``/readiness`` with its worker counts; ``python -m engine.api``
    answers ``/get_model_info``; anything else is refused here, saying what was found."""
    readiness = probe(f"{url}/readiness")  # 503 "insufficient healthy workers" is a router too
    if readiness is not None and "workers" in readiness.text:
        return True
    info = probe(f"{url}/get_model_info")
    if info is not None and info.status_code == 200:
        return False
    if readiness is None and info is None:
        raise RemoteError(f"nothing answers at {url}: start the server or the cluster first")
    raise RemoteError(
        f"{url} is neither sglang-router (python -m engine.cluster --port P: give P) nor "
        "python -m engine.api (it does not answer /get_model_info; the cluster's control API, "
        "P + 1, takes no generations)"
    )


def probe(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=CONNECT_S)
    except httpx.HTTPError:
        return None


def default_control(url: str, cluster: bool) -> str:
    """One server: itself. A cluster: the router's port + 1 (``engine.cluster``'s layout)."""
    if not cluster:
        return url
    parsed = httpx.URL(url)
    if parsed.port is None:
        raise RemoteError(f"{url} names no port: give the control API's URL (--control)")
    return str(parsed.copy_with(port=parsed.port + 1)).rstrip("/")


def get_json(url: str, headers: dict[str, str]) -> dict:
    try:
        answer = httpx.get(url, headers=headers, timeout=httpx.Timeout(READ_S, connect=CONNECT_S))
    except httpx.HTTPError as err:
        raise RemoteError(f"{url}: {type(err).__name__}: {err}") from err
    if answer.status_code != 200:
        raise RemoteError(f"{url} answered {answer.status_code}: {answer.text[:300]}")
    try:
        return answer.json()
    except ValueError:
        raise RemoteError(f"{url} answered what is not JSON: {answer.text[:300]!r}") from None


def check_same_base(router_url: str, base_model_id: str, headers: dict[str, str]) -> None:
    """The router lists one model, the replicas' base: the control API must name the same."""
    listing = get_json(f"{router_url}/v1/models", headers)
    listed = [card["id"] for card in listing.get("data") or []]
    if base_model_id not in listed:
        raise RemoteError(
            f"the control API serves base '{base_model_id}', the router at {router_url} lists "
            f"{listed}: they are not one cluster (give --control)"
        )


# ----- templates ---------------------------------------------------------------------------------


def unfilled(spec: AdapterSpec | None, content: str) -> str | None:
    """The value ``v`` of a one-field template with ``spec.fill(v) == content``, or None. The
    field may recur: ``v``'s length follows from the content's and the literals' (linear time,
    whatever the content)."""
    if spec is None:
        return None
    parts = list(string.Formatter().parse(spec.template))
    fields = sum(field is not None for _, field, _, _ in parts)
    if fields == 0:
        return None
    size, rest = divmod(len(content) - sum(len(literal) for literal, *_ in parts), fields)
    if size < 0 or rest:
        return None
    start = len(parts[0][0])
    value = content[start : start + size]
    return value if spec.fill(value) == content else None


# ----- the wire format --------------------------------------------------------------------------


def common_sampling(params: SamplingParams, cluster: bool) -> dict:
    """Every field, explicitly: left out, the server would take the adapter's own default (a
    default ``max_tokens`` too: the server then refuses a prompt that leaves less room, where
    an embedded engine fits it, since only the server counts the prompt's tokens)."""
    body = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or -1,  # off: the router refuses 0, the API takes -1 as 0
        "stop": list(params.stop),
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "ignore_eos": params.ignore_eos,
        "response_format": response_format(params, cluster),
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    return body | params.extensions()


def chat_sampling(params: SamplingParams, cluster: bool) -> dict:
    body = common_sampling(params, cluster)
    if params.logprobs is not None:
        body |= {"logprobs": True, "top_logprobs": params.logprobs}
    return body


def completion_sampling(params: SamplingParams, cluster: bool) -> dict:
    body = common_sampling(params, cluster)
    if params.logprobs is not None:
        body["logprobs"] = params.logprobs
    return body


def response_format(params: SamplingParams, cluster: bool) -> dict:
    constraint = params.constraint
    if constraint is None:
        return {"type": "text"}
    if constraint.kind == "json_schema":
        schema = json.loads(constraint.spec)
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    if cluster:
        raise InvalidRequestError(
            "a regular-expression constraint (response_format choice or regex, or an "
            "adapter's default one) is refused by sglang-router: use one server's URL",
            "response_format",
        )
    return {"type": "regex", "regex": constraint.spec}


async def sse_events(response: httpx.Response) -> AsyncIterator[dict]:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise RemoteError(
                f"the server streamed an event that is not JSON: {data[:200]!r}"
            ) from None
        yield event


def parse_choice(choice: dict, chat: bool) -> Chunk:
    text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
    logprobs = choice.get("logprobs")
    entries = None
    if logprobs is not None:
        entries = chat_entries(logprobs) if chat else completion_entries(logprobs)
    return Chunk(text=text, token_ids=[], finish_reason=choice.get("finish_reason"),
                 logprobs=entries)  # fmt: skip


def chat_entries(logprobs: dict) -> list[TokenLogprob]:
    return [
        TokenLogprob(NO_TOKEN_ID, e["token"], e["logprob"],
                     [(NO_TOKEN_ID, t["token"], t["logprob"]) for t in e.get("top_logprobs", [])])
        for e in logprobs.get("content") or []
    ]  # fmt: skip


def completion_entries(logprobs: dict) -> list[TokenLogprob]:
    tops = logprobs.get("top_logprobs") or [{} for _ in logprobs["tokens"]]
    return [
        TokenLogprob(NO_TOKEN_ID, token, lp, [(NO_TOKEN_ID, t, v) for t, v in (top or {}).items()])
        for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops)
    ]


def token_count(chunk: Chunk) -> int:
    """Tokens in a streamed chunk: its log-probability entries, else one (the server sends an
    event per token, unless it held text back)."""
    return len(chunk.logprobs) if chunk.logprobs is not None else 1


def finished(final: Chunk, usage: Usage | None, counted: int, clock: RequestClock) -> Chunk:
    """The last chunk: the tokens not yet counted, the usage, the timings seen here."""
    if usage is None:
        usage = Usage(0, counted + (token_count(final) if final.text or final.logprobs else 0))
    rest = max(usage.completion_tokens - counted, 0)
    final.token_ids = [NO_TOKEN_ID] * rest
    final.usage = usage
    final.timings = clock.timings(usage.completion_tokens)
    return final


# ----- errors ------------------------------------------------------------------------------------


def error_of(response: httpx.Response) -> tuple[int, dict]:
    """(status, the OpenAI error object) of an error answer, whatever its shape (the router's
    own errors have no ``type`` or ``param``; its 413 is plain text)."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = response.json()["error"]
        if isinstance(error, dict):
            return response.status_code, error
    return response.status_code, {"message": response.text[:300] or response.reason_phrase}


def engine_error(status: int, error: dict) -> EngineError:
    """The ``EngineError`` an embedded engine raises for the same refusal."""
    message, param = str(error.get("message") or f"HTTP {status}"), error.get("param")
    too_long = message.startswith("This model's maximum context length")
    if (status == 400 and too_long) or (status == 413 and "context" in message):  # 413: before
        return PromptTooLongError(message, param)
    if status == 413:  # a body over the limit (the router's is plain text)
        return RemoteError(message, 413, "invalid_request_error")
    if status in (400, 422):
        return InvalidRequestError(message, param)
    if status == 503:
        return RequestEndedError(message)
    return RemoteError(message, status, str(error.get("type") or "server_error"))


def stream_error(error: dict) -> EngineError:
    """An error event after the stream began (the server's drain or an unload ended it)."""
    status = error.get("code") if isinstance(error.get("code"), int) else 500
    return engine_error(status, error)
