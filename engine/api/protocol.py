"""The OpenAI wire format: request bodies, errors, response payloads and SSE rendering."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..interface import Chunk, EngineError

DEFAULT_MAX_TOKENS = 256


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False
    """Extension (as in vLLM/SGLang): keep generating past end-of-sequence."""


class CompletionBody(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None


class ChatBody(SamplingFields):
    messages: list[dict]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def engine_error(err: EngineError) -> OpenAIError:
    return OpenAIError(err.status_code, str(err), err.error_type, getattr(err, "param", None))


def completion_payload(kind: str, rid: str, model: str, created: int, chunk_fields: dict) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": model, **chunk_fields}


def usage_dict(usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_events(endpoint, rid, model, created, first, chunks, include_usage):
    kind = "text_completion" if endpoint == "completions" else "chat.completion.chunk"
    try:
        if endpoint == "chat":
            role = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "finish_reason": None,
            }
            yield sse(completion_payload(kind, rid, model, created, {"choices": [role]}))
        chunk, usage = first, None
        while chunk is not None:
            choice = {"index": 0, "finish_reason": chunk.finish_reason}
            if endpoint == "chat":
                choice["delta"] = {"content": chunk.text} if chunk.text else {}
            else:
                choice |= {"text": chunk.text, "logprobs": None}
            if chunk.text or chunk.finish_reason:
                yield sse(completion_payload(kind, rid, model, created, {"choices": [choice]}))
            usage = chunk.usage or usage
            chunk = await anext(chunks, None)
        if include_usage and usage is not None:
            fields = {"choices": [], "usage": usage_dict(usage)}
            yield sse(completion_payload(kind, rid, model, created, fields))
        yield sse("[DONE]")
    except OpenAIError as err:
        yield sse({"error": {"message": err.message, "type": err.kind, "code": err.status}})
        raise
    finally:
        await chunks.aclose()


def whole_response(endpoint, rid, model, created, parts: list[Chunk]) -> dict:
    text = "".join(p.text for p in parts)
    last = parts[-1]
    if endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
        kind = "text_completion"
    choice["finish_reason"] = last.finish_reason
    fields = {"choices": [choice], "usage": usage_dict(last.usage)}
    return completion_payload(kind, rid, model, created, fields)
