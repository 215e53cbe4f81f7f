"""The OpenAI wire format: typed request bodies, errors, response payloads and SSE rendering.

Requests are strict: a field of the wrong type (``"max_tokens": "8"``, ``"stream": "yes"``) or
a field this server does not know is a 400 naming it; an OpenAI field it cannot honour is a 400
saying so (``UNSUPPORTED``), never silently ignored. Extensions, as in vLLM and SGLang:
``top_k``, ``ignore_eos``, ``prompt_template`` / ``template_fields`` (an adapter's prompt
template), and ``response_format`` types ``choice`` and ``regex``.
"""

from __future__ import annotations

import codecs
import json
import re
import reprlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..constraints import ResponseFormat
from ..interface import (
    MIN_REPETITION_PENALTY,
    EngineError,
    TokenLogprob,
    Usage,
    clipped,
    stop_problem,
)
from ..text import token_bytes

Endpoint = Literal["chat", "completions"]
UNSUPPORTED = {
    "functions": "functions (deprecated by OpenAI) are not supported: send tools",
    "function_call": "function_call (deprecated by OpenAI) is not supported: send tool_choice",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the models here do not reason",
    "web_search_options": "web search is not supported",
    "store": "stored completions are not supported",
    "metadata": "stored completions are not supported",
    "service_tier": "there are no service tiers",
    "suffix": "suffix (insertion) is not supported",
}
"""OpenAI fields this server cannot honour: a request that sets one (other than to null, an
empty list, or a value in ``NOTHING_ASKED``) gets a 400 naming it."""
NOTHING_ASKED = {"store": [False], "service_tier": ["auto", "default"]}
"""Values of ``UNSUPPORTED`` fields that ask for what this server does anyway: nothing stored,
the one tier there is (OpenAI's default tiers)."""
EMPTY_ASKS = {"web_search_options"}
"""Fields whose empty value still asks for something (``web_search_options: {}`` turns web search
on with its defaults): only null leaves them off."""
SGLANG_DEFAULTS = {
    "no_stop_trim": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
}
"""SGLang's extension fields at the values that ask for what this server does anyway.
sglang-router writes them into every request it forwards (``engine.cluster``); at these values
they are accepted, at any other a 400 names the field."""


class OpenAIError(Exception):
    """An error with its HTTP status and OpenAI error type; ``param`` names the field."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.counted = False
        """Already in ``/metrics`` (a generation request counts its own, under its adapter)."""

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        }


def invalid(message: str, param: str | None = None, status: int = 400) -> OpenAIError:
    return OpenAIError(status, message, "invalid_request_error", param)


def from_engine(err: EngineError) -> OpenAIError:
    return OpenAIError(err.status_code, str(err), err.error_type, getattr(err, "param", None))


def refuse_unsupported(body: dict) -> None:
    """A 400 for an OpenAI field this server cannot honour; the same field left empty (null,
    [], {}) or asking for what this server does anyway (``NOTHING_ASKED``) is dropped."""
    for name, why in UNSUPPORTED.items():
        if name not in body:
            continue
        value = body[name]
        asks_nothing = value is None if name in EMPTY_ASKS else value in (None, [], {})
        as_here = any(type(value) is type(v) and value == v for v in NOTHING_ASKED.get(name, []))
        if asks_nothing or as_here:
            del body[name]
            continue
        raise invalid(f"{name}: {why}", name)
    for name, default in SGLANG_DEFAULTS.items():
        if name in body and body.pop(name) is not default:
            raise invalid(f"{name}: only {json.dumps(default)} is supported", name)
    if body.get("best_of") not in (None, body.get("n", 1)):
        raise invalid("best_of: only best_of = n is supported (no server-side ranking)", "best_of")


TOKEN_ID_KEY = re.compile(r"0|[1-9][0-9]{0,8}")
"""A ``logit_bias`` key: a token id in decimal, no sign, no leading zero (so no two keys name one
token), at most 9 digits."""


ANSWER_ONLY_FIELDS = {
    "refusal": "this server's answers have no refusals: send the text as content",
    "function_call": "function_call (deprecated by OpenAI) is not supported: send tool_calls",
    "audio": "audio is not supported",
    "annotations": "this server's answers have no annotations",
}


LIST_FIELDS = {"annotations"}
"""Of ``ANSWER_ONLY_FIELDS``, those whose empty value is a list (the others' is null)."""


MAX_LIST = 4096
"""The most items of a list or object in a request (messages, a message's parts and calls, stop
strings, ``logit_bias``, template fields): a body of many bad items gets one error, not one per
item, so its 400 costs the event loop no more than a good body's validation. Fields with a
lower rule (4 stop strings, 300 biases) check it after."""


def at_most_max_list(_, value):
    """Before an object's items are validated (pydantic checks a dict's ``max_length`` after)."""
    if isinstance(value, dict) and len(value) > MAX_LIST:
        raise ValueError(f"at most {MAX_LIST} entries, not {len(value)}")
    return value


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Wire):
    type: Literal["text"]
    text: str


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
"""A function's name, as OpenAI allows it."""


class FunctionSpec(Wire):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON Schema of the arguments (an object); none: any object."""
    strict: bool | None = None
    """Honoured always: the arguments are constrained to ``parameters`` either way."""


class Tool(Wire):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(Wire):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(Wire):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(Wire):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str
    """The arguments as JSON text, as this server (and OpenAI) answer them."""


class ToolCall(Wire):
    """A call of an answer sent back in the next request's messages."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    """``developer`` is OpenAI's newer name for ``system``, and is treated as one; ``tool``
    carries a tool's result back."""
    content: str | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_LIST)]
    """A list of parts holds at least one, as OpenAI asks (a string may be empty)."""
    name: str | None = Field(None, max_length=256)
    """A participant's name, passed to the chat template as vLLM passes it (the shipped
    templates, SmolLM2's and Gemma's, show none)."""
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_LIST)
    """On an assistant's message: the calls it made (the next request sends them back)."""
    tool_call_id: str | None = Field(None, max_length=256, validate_default=True)
    """On a tool's message, required (as OpenAI's): the call it answers (the prompt shows results
    in order)."""
    refusal: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None
    """The fields of an answer's message other than ``role`` and ``content`` (the OpenAI SDK
    sends them back when a client appends an answer to its next request's messages): on an
    assistant's message, accepted null or empty, as this server answers them; a 400 naming the
    field otherwise."""

    @model_validator(mode="before")
    @classmethod
    def calls_need_no_content(cls, message):
        """An assistant's message with tool calls may have null content, as OpenAI's has."""
        if (
            isinstance(message, dict)
            and message.get("tool_calls")
            and message.get("content") is None
        ):
            return message | {"content": ""}
        return message

    @field_validator("tool_calls")
    @classmethod
    def calls_are_an_answers(cls, calls, info: ValidationInfo):
        if calls is not None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant's message has tool calls")
        seen = set()
        for call in calls or []:
            if call.id in seen:  # a set, not ids.count: 14,500 calls took 2 s of the event loop
                raise ValueError(
                    f"each call's id once: {call.id!r} is twice (a result answers one id)"
                )
            seen.add(call.id)
        return calls or None

    @field_validator("tool_call_id")
    @classmethod
    def ids_are_a_tools(cls, call_id, info: ValidationInfo):
        if call_id is not None and info.data.get("role") != "tool":
            raise ValueError("only a tool's message answers a tool call")
        if call_id is None and info.data.get("role") == "tool":
            raise ValueError("a tool's message needs the id of the call it answers")
        return call_id

    @field_validator(*ANSWER_ONLY_FIELDS)
    @classmethod
    def empty_as_answered(cls, value, info: ValidationInfo):
        if info.data.get("role") != "assistant":
            raise ValueError("only an assistant's message (an answer sent back) has this field")
        if value is not None and (value != [] or info.field_name not in LIST_FIELDS):
            raise ValueError(ANSWER_ONLY_FIELDS[info.field_name])
        return value

    def as_engine_message(self) -> dict:
        """The engine's message: text content, an assistant's calls and a tool's call id as
        OpenAI's (the prompt writes the calls after the text: ``text.template_messages``; a
        server behind ``app.py --remote`` checks the ids)."""
        role = "system" if self.role == "developer" else self.role
        text = self.content
        if not isinstance(text, str):
            text = "\n".join(part.text for part in text)
        message = {"role": role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class StreamOptions(Wire):
    include_usage: bool = False
    include_obfuscation: bool | None = None
    """OpenAI pads its stream's events with random text unless this is false; this server never
    does, so false (or null) is what it serves and true a 400."""

    @field_validator("include_obfuscation")
    @classmethod
    def never_padded(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("true is not served: this server never pads its events")
        return value


NULL_IS_DEFAULT = {"n", "stream", "ignore_eos", "echo", "logprobs", "prompt_template"}
"""Fields whose null means "not given" (OpenAI's and vLLM's schemas let them be null)."""


class SamplingFields(Wire):
    """What both endpoints take. ``None`` = not given: the adapter's default from adapters.yaml,
    else the server's (``engine.sampling.resolve``)."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    """Extension: -1 or 0 = off."""
    stop: str | Annotated[list[str], Field(max_length=MAX_LIST)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LIST)
    """Token id (as a string, as OpenAI sends it) → bias in [-100, 100]."""
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    """vLLM's and SGLang's: leave out tokens less likely than ``min_p`` × the likeliest one's
    probability."""
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=2.0)
    """vLLM's and SGLang's: divide a generated token's logit by it (multiply a negative one)."""
    min_tokens: int | None = Field(None, ge=0)
    """vLLM's and SGLang's: no end of turn before this many tokens."""
    response_format: ResponseFormat | None = None
    user: str | None = None
    """Accepted, as OpenAI does: an end-user id that does not change the answer."""
    ignore_eos: bool = False
    """Extension: keep generating past end-of-sequence (load tests use it)."""
    best_of: int | None = Field(None, ge=1)
    """Accepted only equal to ``n``."""
    models: list[str] | None = Field(None, min_length=1, max_length=32)
    """Extension, fan-out: the same request to each of these models (adapters, ``base``) in one
    batch; ``model`` must then be ``"fanout"``. Choice *i* is ``models[i]``'s (with ``n`` > 1,
    ``models[i // n]``) and names it in ``model``; streamed chunks carry it as their ``model``."""

    @model_validator(mode="before")
    @classmethod
    def null_is_not_given(cls, body):
        """OpenAI's schema lets these be null (clients that send every field do): the default."""
        if not isinstance(body, dict):
            return body
        nullable = NULL_IS_DEFAULT & cls.model_fields.keys()  # another endpoint's: unknown here
        return {k: v for k, v in body.items() if v is not None or k not in nullable}

    biases_at_most = field_validator("logit_bias", mode="before")(classmethod(at_most_max_list))

    @field_validator("stream_options")
    @classmethod
    def only_when_streaming(cls, options, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options

    @field_validator("models")
    @classmethod
    def distinct_models(cls, models):
        if models is not None and len(set(models)) != len(models):
            raise ValueError("list each model once")
        return models

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, stop):
        if problem := stop_problem([stop] if isinstance(stop, str) else stop or []):
            raise ValueError(problem)
        return stop

    @field_validator("logit_bias")
    @classmethod
    def token_ids_as_keys(cls, bias):
        if bias is None:
            return None
        if len(bias) > 300:
            raise ValueError("at most 300 tokens")
        for key, value in bias.items():
            token_id = TOKEN_ID_KEY.fullmatch(key) is not None  # one spelling per token
            if not token_id or not -100 <= value <= 100:
                got = clipped(f"{key!r}: {value!r}")
                raise ValueError(f"want token id → bias in [-100, 100], got {got}")
        return bias

    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def engine_seed(self) -> int | None:
        return None if self.seed is None else self.seed % 2**63


class CompletionBody(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt", mode="before")
    @classmethod
    def token_arrays_hold_token_ids(cls, prompt):
        """Names the first item of a token-array prompt that is not a token id (pydantic's union
        error would name the ``list[str]`` branch's complaint about item 0)."""
        if not isinstance(prompt, list) or all(isinstance(p, str) for p in prompt):
            return prompt
        nested = all(isinstance(p, list) for p in prompt)
        for i, row in enumerate(prompt if nested else [prompt]):
            bad = next((j for j, t in enumerate(row) if type(t) is not int), None)
            if bad is not None:
                where = f"prompt[{i}][{bad}]" if nested else f"prompt[{bad}]"
                shown = reprlib.repr(row[bad])  # bounded: an item may be nested deep or long
                raise ValueError(f"a token-array prompt holds integers; {where} is {shown}")
        return prompt

    echo: bool = False
    """Prepend the prompt to the answer."""
    logprobs: int | None = Field(None, ge=0, le=5)
    """Log-probabilities of each token and the most likely ``logprobs`` alternatives."""


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(default_factory=list, max_length=MAX_LIST)
    """May be empty only with ``template_fields``."""
    prompt_template: Literal["apply", "raw"] = "apply"
    """Extension: ``apply`` fills the adapter's prompt template (from adapters.yaml) with the
    last user message; ``raw`` sends the messages as they are."""
    template_fields: dict[str, str] | None = Field(None, max_length=MAX_LIST)
    """Extension: values of the adapter template's named fields; the filled template becomes a
    new last user message."""
    fields_at_most = field_validator("template_fields", mode="before")(
        classmethod(at_most_max_list)
    )
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    """Functions the answer may call (``engine/api/tools.py``)."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """``required`` (at least one call) or a named function, made by a grammar; ``auto``
    (OpenAI's default with tools): calls or text, the model's choice; ``none``: no call (the
    tools are not shown). ``engine/api/tools.py``."""
    parallel_tool_calls: bool | None = None
    """With ``required`` or ``auto``: several calls in one answer (the default), or one."""


class TokenizeBody(Wire):
    """``POST /tokenize`` (vLLM's and SGLang's route): the token ids a generation of this
    server would see for a ``prompt`` (as ``/v1/completions`` takes it) or for ``messages`` (as
    ``/v1/chat/completions`` does: the adapter's prompt template filled, the chat template
    applied). The fields that would change the tokens are accepted only at the values generation
    uses, so ``count`` is the prompt's ``usage.prompt_tokens``."""

    model: str | None = Field(None, min_length=1)
    """The base model when not given; an unknown model is a 404, as for generation."""
    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_LIST)
    prompt_template: Literal["apply", "raw"] = "apply"
    template_fields: dict[str, str] | None = Field(None, max_length=MAX_LIST)
    fields_at_most = field_validator("template_fields", mode="before")(
        classmethod(at_most_max_list)
    )
    add_special_tokens: bool | None = None
    """vLLM's: a prompt is tokenized with them (true), chat messages without (false)."""
    add_generation_prompt: bool = True
    """vLLM's: the chat template's assistant turn is opened, as for generation (only true)."""
    return_token_strs: bool = False
    """vLLM's: each token's text beside its id."""

    @model_validator(mode="before")
    @classmethod
    def null_is_not_given(cls, body):
        """As for generation (``NULL_IS_DEFAULT``), and vLLM's ``return_token_strs`` may be null."""
        if not isinstance(body, dict):
            return body
        nullable = {"prompt_template", "return_token_strs"}
        return {k: v for k, v in body.items() if v is not None or k not in nullable}

    @field_validator("add_special_tokens")
    @classmethod
    def as_generation_adds_them(cls, add: bool | None, info: ValidationInfo):
        chat = info.data.get("prompt") is None
        if add is not None and add == chat:
            kind = "chat messages" if chat else "a prompt"
            raise ValueError(f"only as generation uses it: {json.dumps(not chat)} for {kind}")
        return add

    @field_validator("add_generation_prompt")
    @classmethod
    def as_generation_opens_the_answer(cls, add: bool):
        if not add:
            raise ValueError("only true: generation opens the assistant's turn")
        return add

    def chat(self) -> bool:
        """Messages (or template fields) rather than a prompt; both or neither is a 400."""
        chat = self.messages is not None or self.template_fields is not None
        if (self.prompt is None) == (not chat):
            why = "not both" if chat else "one of them"
            raise invalid(f"give a prompt or messages (with template_fields): {why}", "prompt")
        return chat


class DetokenizeBody(Wire):
    """``POST /detokenize``: token ids back to text."""

    model: str | None = Field(None, min_length=1)
    tokens: list[int] = Field(min_length=1)


class AdapterBody(Wire):
    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=4096)


class MergeBody(Wire):
    """``POST /v1/adapters/merge``: served adapters combined into a new one (peft's
    ``add_weighted_adapter``), written under the adapter root and loaded."""

    name: str = Field(min_length=1, max_length=64)
    adapters: list[str] = Field(min_length=1, max_length=16)
    method: Literal["linear", "cat", "ties", "dare_ties", "svd"]
    weights: list[float] | None = None
    density: float | None = Field(None, gt=0.0, le=1.0)
    svd_rank: int | None = Field(None, ge=1)


UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", NamedToolChoice.__name__}
"""What pydantic puts in an error's location for a union's branch, besides tags with ``[``: a
type's name (``NamedToolChoice``: the one model in a union here)."""


INSTANCE_OF = re.compile(r" or instance of \w+")


def field_path(loc) -> list[str]:
    """A pydantic error's location without the union-branch tags it adds (``str``,
    ``list[int]``, ``function-after[...]``, ``NamedToolChoice``)."""
    return [str(p) for p in loc if str(p) not in UNION_TAGS and "[" not in str(p)]


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's errors → (message, param) in plain words, naming the field. Of a union's
    errors, the one that got furthest into the value is the one that explains it, and of those
    as far, a broken rule of a type the value has over the type it has not."""
    error = max(errors, key=lambda e: (len(field_path(e.get("loc", ()))), "_type" not in e["type"]))
    param = ".".join(field_path(error.get("loc", ()))) or None
    param = param and clipped(param)
    if error["type"] == "extra_forbidden":
        return f"unknown field '{param}'", param
    if error["type"] == "missing":
        return f"{param}: required", param
    message = error.get("msg", "invalid").removeprefix("Value error, ")
    message = INSTANCE_OF.sub("", message).replace(" after validation", "")  # pydantic's words
    return (f"{param}: {message}" if param else message), param


# ----- responses ------------------------------------------------------------------------------


def usage_dict(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {
                "token": e.text,
                "logprob": e.logprob,
                "bytes": list(token_bytes(e.text)),
                "top_logprobs": [
                    {"token": text, "logprob": lp, "bytes": list(token_bytes(text))}
                    for _, text, lp in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


class TextOffsets:
    """A completion choice's ``text_offset``s, across its chunks: the characters of its text
    before each token (a token that is part of a character adds it once the character is
    whole, as the text shows it)."""

    def __init__(self, at: int = 0):
        self.at, self.characters = at, codecs.getincrementaldecoder("utf-8")("replace")

    def of(self, entries: list[TokenLogprob]) -> list[int]:
        offsets = []
        for e in entries:
            offsets.append(self.at)
            self.at += len(self.characters.decode(token_bytes(e.text)))
        return offsets

    def skip(self, text: str) -> None:
        self.at += len(text)


def completion_logprobs(entries: list[TokenLogprob], offsets: TextOffsets | None = None) -> dict:
    """OpenAI's legacy shape."""
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [with_the_sampled(e) for e in entries],
        "text_offset": (offsets or TextOffsets()).of(entries),
    }


def with_the_sampled(entry: TokenLogprob) -> dict[str, float]:
    """The most likely tokens and the sampled one, as OpenAI's legacy completions answer them
    (up to ``logprobs`` + 1 entries)."""
    top = {text: lp for _, text, lp in entry.top}
    top.setdefault(entry.text, entry.logprob)
    return top


CHAT_TEXT_FIELD = '"delta": {"content": '
"""How a chat text event's delta starts on the wire (``json.dumps``'s default separators, as
``ChunkWriter.choice`` writes it too); a load test finds a stream's first text by it."""


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class ChunkWriter:
    """SSE events of one streamed response. Text-only chunks, the hot path at hundreds of
    streams, are one ``json.dumps`` of the text between a precomputed prefix and suffix.
    ``choice_models[i]`` is the model choice *i* comes from (its chunks' ``model``): the request's
    model, or with fan-out each choice's own. With ``include_usage`` every chunk but the last
    carries ``"usage": null``, as OpenAI's do."""

    def __init__(
        self,
        endpoint: Endpoint,
        rid: str,
        model: str,
        created: int,
        choice_models: list[str],
        include_usage: bool = False,
    ):
        self.endpoint = endpoint
        self.kind = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
        self.head = {"id": rid, "object": self.kind, "created": created, "model": model}
        self.choice_models = choice_models
        self.include_usage = include_usage
        self.text_prefix: dict[int, str] = {}
        usage = ', "usage": null' if include_usage else ""
        self.text_suffix = f', "logprobs": null, "finish_reason": null}}]{usage}}}\n\n'

    def payload(self, index: int | None = None, **fields: Any) -> bytes:
        head = self.head if index is None else self.head | {"model": self.choice_models[index]}
        if self.include_usage:
            fields.setdefault("usage", None)
        return sse({**head, **fields})

    def role(self, index: int, content: str | None = "") -> bytes:
        """The first event of a chat choice (a tool-call answer's content is null, as OpenAI's)."""
        choice = {"index": index, "delta": {"role": "assistant", "content": content}}
        return self.payload(index, choices=[{**choice, "logprobs": None, "finish_reason": None}])

    def text(self, index: int, text: str) -> bytes:
        prefix = self.text_prefix.get(index)
        if prefix is None:
            head = self.head | {"model": self.choice_models[index]}
            head = json.dumps(head, ensure_ascii=False)[:-1]
            field = CHAT_TEXT_FIELD if self.endpoint == "chat" else '"text": '
            prefix = f'data: {head}, "choices": [{{"index": {index}, {field}'
            self.text_prefix[index] = prefix
        close = "}" if self.endpoint == "chat" else ""
        return f"{prefix}{json.dumps(text, ensure_ascii=False)}{close}{self.text_suffix}".encode()

    def choice(
        self, index: int, text: str, finish: str | None, logprobs: dict | None = None
    ) -> bytes:
        body = {"delta": {"content": text} if text else {}}
        if self.endpoint == "completions":
            body = {"text": text}
        choice = {"index": index, **body, "logprobs": logprobs, "finish_reason": finish}
        return self.payload(index, choices=[choice])

    def usage(self, usage: Usage) -> bytes:
        return self.payload(choices=[], usage=usage_dict(usage))

    @staticmethod
    def error(err: OpenAIError) -> bytes:
        return sse(err.body())

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"
