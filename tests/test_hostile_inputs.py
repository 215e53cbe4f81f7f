"""Hostile and malformed requests, table-driven, over real HTTP against the CPU default: each gets
the expected 4xx in OpenAI's error shape (never a 500, a redirect or another shape), and the
server keeps serving (``/health`` answers after every one, on the same keep-alive connection).

The cases that once crashed a request or reset the connection are here first."""

from __future__ import annotations

import json

import httpx
import pydantic
import pytest

from engine.api import create_api
from engine.api.protocol import MAX_LIST, ChatBody, validation_message

TOKEN = "s3cret"
CHAT = "/v1/chat/completions"
DONE = "/v1/completions"
OK_CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
OK_DONE = {"model": "base", "prompt": "The sky is", "max_tokens": 2}
AUTH = {"authorization": f"Bearer {TOKEN}"}


def chat(**changes):
    body = {**OK_CHAT, **changes}
    return {k: v for k, v in body.items() if v is not ...}


def completion(**changes):
    body = {**OK_DONE, **changes}
    return {k: v for k, v in body.items() if v is not ...}


def message(**fields):
    return chat(messages=[{"role": "user", "content": "Hi"} | fields])


CALLED = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}  # fmt: skip
TOOL_RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}


def called(arguments: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}]}  # fmt: skip


# (id, method, path, body: dict | bytes | None, headers, status, param or None)
# fmt: off
CASES = [
    # once 500s or resets
    ("lone-surrogate-chat", "POST", CHAT, message(content="x\ud800y"), {}, 400, "messages.0.content"),
    ("lone-surrogate-completion", "POST", DONE, completion(prompt="x\udc00"), {}, 400, "prompt"),
    ("lone-surrogate-stop", "POST", CHAT, chat(stop="\ud800"), {}, 400, "stop"),
    ("seed-2^64", "POST", CHAT, chat(seed=2**64), {}, 400, "seed"),
    ("seed-huge-negative", "POST", CHAT, chat(seed=-(2**70)), {}, 400, "seed"),
    ("nul-in-adapter-path", "POST", "/v1/adapters", {"name": "x2", "path": "alpha\u0000"}, AUTH, 400, "path"),
    ("non-utf8-body", "POST", CHAT, b'{"model": "\xff\xfe"}', {}, 400, None),
    ("nan-in-a-list", "POST", CHAT, json.dumps(chat(stop=["a", float("nan")])).encode(), {}, 400, "stop.1"),
    ("infinity-literal", "POST", DONE, json.dumps(completion(max_tokens=4, top_p=float("-inf"))).encode(), {}, 400, "top_p"),
    ("deep-nesting", "POST", CHAT, b"[" * 30_000 + b"]" * 30_000, {}, 400, None),
    ("deep-nesting-object", "POST", CHAT, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, {}, 400, None),
    # loose types are refused
    ("max_tokens-string", "POST", CHAT, chat(max_tokens="8"), {}, 400, "max_tokens"),
    ("max_tokens-bool", "POST", CHAT, chat(max_tokens=True), {}, 400, "max_tokens"),
    ("max_tokens-float", "POST", CHAT, chat(max_tokens=8.5), {}, 400, "max_tokens"),
    ("max_tokens-zero", "POST", CHAT, chat(max_tokens=0), {}, 400, "max_tokens"),
    ("max_tokens-negative", "POST", CHAT, chat(max_tokens=-5), {}, 400, "max_tokens"),
    ("max_tokens-huge", "POST", CHAT, chat(max_tokens=10**9), {}, 400, "max_tokens"),
    ("max_completion_tokens-string", "POST", CHAT, chat(max_completion_tokens="4"), {}, 400, "max_completion_tokens"),
    ("stream-string", "POST", CHAT, chat(stream="yes"), {}, 400, "stream"),
    ("stream-int", "POST", CHAT, chat(stream=1), {}, 400, "stream"),
    ("stream_options-not-object", "POST", CHAT, chat(stream=True, stream_options=True), {}, 400, "stream_options"),
    ("stream_options-unknown", "POST", CHAT, chat(stream=True, stream_options={"x": 1}), {}, 400, "stream_options.x"),
    ("temperature-string", "POST", CHAT, chat(temperature="0.5"), {}, 400, "temperature"),
    ("temperature-bool", "POST", CHAT, chat(temperature=False), {}, 400, "temperature"),
    ("temperature-negative", "POST", CHAT, chat(temperature=-0.1), {}, 400, "temperature"),
    ("temperature-too-high", "POST", CHAT, chat(temperature=2.5), {}, 400, "temperature"),
    ("temperature-nan", "POST", CHAT, b'{"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', {}, 400, "temperature"),
    ("temperature-infinity", "POST", CHAT, b'{"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "temperature": Infinity}', {}, 400, "temperature"),
    ("top_p-zero", "POST", CHAT, chat(top_p=0), {}, 400, "top_p"),
    ("top_p-above-one", "POST", CHAT, chat(top_p=1.5), {}, 400, "top_p"),
    ("top_k-below-minus-one", "POST", CHAT, chat(top_k=-2), {}, 400, "top_k"),
    ("top_k-float", "POST", CHAT, chat(top_k=2.5), {}, 400, "top_k"),
    ("n-zero", "POST", CHAT, chat(n=0), {}, 400, "n"),
    ("n-too-many", "POST", CHAT, chat(n=17), {}, 400, "n"),
    ("n-string", "POST", CHAT, chat(n="2"), {}, 400, "n"),
    ("seed-string", "POST", CHAT, chat(seed="1"), {}, 400, "seed"),
    ("seed-float", "POST", CHAT, chat(seed=1.5), {}, 400, "seed"),
    ("presence_penalty-range", "POST", CHAT, chat(presence_penalty=3), {}, 400, "presence_penalty"),
    ("frequency_penalty-range", "POST", CHAT, chat(frequency_penalty=-2.5), {}, 400, "frequency_penalty"),
    ("frequency_penalty-string", "POST", CHAT, chat(frequency_penalty="1"), {}, 400, "frequency_penalty"),
    ("mixed-prompts-one-out-of-vocab", "POST", DONE, completion(prompt=[[1, 2, 3], [10**7]]), {}, 400, "prompt"),
    ("mixed-prompts-stream-one-out-of-vocab", "POST", DONE, completion(prompt=[[1, 2], [10**7]], stream=True), {}, 400, "prompt"),
    ("integer-of-5000-digits", "POST", CHAT, b'{"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1' + b"0" * 5000 + b"}", {}, 400, None),
    ("logit_bias-superscript-digit", "POST", CHAT, chat(logit_bias={"\u00b2": 1}), {}, 400, "logit_bias"),
    ("logit_bias-out-of-vocab", "POST", CHAT, chat(logit_bias={"99999999": 1}), {}, 400, "logit_bias"),
    ("fanout-one-model-two-names", "POST", CHAT, chat(model="fanout", models=["alpha", "base:alpha"]), {}, 400, "models"),
    ("generations-over-the-limit", "POST", DONE, completion(prompt=["a"] * 16, n=16), {}, 400, "n"),
    ("prompts-over-the-limit", "POST", DONE, completion(prompt=["a"] * 65), {}, 400, "prompt"),
    ("logit_bias-not-token-id", "POST", CHAT, chat(logit_bias={"hello": 5}), {}, 400, "logit_bias"),
    ("logit_bias-out-of-range", "POST", CHAT, chat(logit_bias={"5": 101}), {}, 400, "logit_bias"),
    ("logit_bias-leading-zero", "POST", CHAT, chat(logit_bias={"905": 1, "0905": -1}), {}, 400, "logit_bias"),
    ("logit_bias-list", "POST", CHAT, chat(logit_bias=[1, 2]), {}, 400, "logit_bias"),
    ("stop-five", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), {}, 400, "stop"),
    ("stop-empty-string", "POST", CHAT, chat(stop=[""]), {}, 400, "stop"),
    ("stop-int", "POST", CHAT, chat(stop=5), {}, 400, "stop"),
    ("stop-nested", "POST", CHAT, chat(stop=[["a"]]), {}, 400, "stop"),
    ("stop-too-long", "POST", CHAT, chat(stop=["x" * 1001]), {}, 400, "stop"),
    ("ignore_eos-string", "POST", CHAT, chat(ignore_eos="true"), {}, 400, "ignore_eos"),
    ("user-int", "POST", CHAT, chat(user=5), {}, 400, "user"),
    ("logprobs-int-on-chat", "POST", CHAT, chat(logprobs=3), {}, 400, "logprobs"),
    ("top_logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), {}, 400, "top_logprobs"),
    ("top_logprobs-too-many", "POST", CHAT, chat(logprobs=True, top_logprobs=21), {}, 400, "top_logprobs"),
    ("completion-logprobs-too-many", "POST", DONE, completion(logprobs=6), {}, 400, "logprobs"),
    ("completion-logprobs-bool", "POST", DONE, completion(logprobs=True), {}, 400, "logprobs"),
    ("completion-echo-with-logprobs", "POST", DONE, completion(echo=True, logprobs=1), {}, 400, "echo"),
    ("completion-echo-token-prompt", "POST", DONE, completion(echo=True, prompt=[1, 2]), {}, 400, "echo"),
    ("completion-echo-string", "POST", DONE, completion(echo="yes"), {}, 400, "echo"),
    # fields that would be ignored are refused, naming them
    ("tools-without-a-choice-is-auto", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), {}, 200, None),
    ("tools-auto-with-stop", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}], stop=["]"]), {}, 400, "stop"),
    ("tools-not-functions", "POST", CHAT, chat(tools=[{"type": "retrieval"}], tool_choice="required"), {}, 400, "tools.0.type"),
    ("tool-name-with-spaces", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b"}}], tool_choice="required"), {}, 400, "tools.0.function.name"),
    ("tool-choice-unknown-function", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function", "function": {"name": "g"}}), {}, 400, "tool_choice"),
    ("tool-parameters-endless", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}}}], tool_choice="required"), {}, 400, "tools"),
    ("tool_choice", "POST", CHAT, chat(tool_choice="required"), {}, 400, "tool_choice"),
    ("functions", "POST", CHAT, chat(functions=[{"name": "f"}]), {}, 400, "functions"),
    ("function_call", "POST", CHAT, chat(function_call="auto"), {}, 400, "function_call"),
    ("parallel_tool_calls", "POST", CHAT, chat(parallel_tool_calls=True), {}, 400, "parallel_tool_calls"),
    ("audio", "POST", CHAT, chat(audio={"voice": "alloy"}), {}, 400, "audio"),
    ("modalities", "POST", CHAT, chat(modalities=["text", "audio"]), {}, 400, "modalities"),
    ("prediction", "POST", CHAT, chat(prediction={"type": "content", "content": "x"}), {}, 400, "prediction"),
    ("reasoning_effort", "POST", CHAT, chat(reasoning_effort="high"), {}, 400, "reasoning_effort"),
    ("store", "POST", CHAT, chat(store=True), {}, 400, "store"),
    ("store-zero", "POST", CHAT, chat(store=0), {}, 400, "store"),
    ("store-false", "POST", CHAT, chat(store=False), {}, 200, None),  # nothing stored: as here
    ("stream_options-obfuscation-off", "POST", CHAT, chat(stream=True, stream_options={"include_obfuscation": False}), {}, 200, None),  # never padded
    ("model-name-of-60k-characters", "POST", CHAT, chat(model="m" * 60_000), {}, 404, "model"),
    ("logit_bias-key-of-60k-digits", "POST", CHAT, chat(logit_bias={"1" * 60_000: 1}), {}, 400, "logit_bias"),
    ("unknown-field-of-60k-characters", "POST", CHAT, chat(**{"k" * 60_000: 1}), {}, 400, "kkk"),
    ("message-with-a-name", "POST", CHAT, chat(messages=[{"role": "user", "content": "hi", "name": "bob"}]), {}, 200, None),  # to the template
    ("service_tier-auto", "POST", CHAT, chat(service_tier="auto"), {}, 200, None),  # the one tier
    ("service_tier-default", "POST", CHAT, chat(service_tier="default"), {}, 200, None),
    ("metadata", "POST", CHAT, chat(metadata={"a": "b"}), {}, 400, "metadata"),
    ("service_tier", "POST", CHAT, chat(service_tier="flex"), {}, 400, "service_tier"),
    ("web_search_options", "POST", CHAT, chat(web_search_options={}), {}, 400, "web_search_options"),  # {}: on
    ("web_search_options-null", "POST", CHAT, chat(web_search_options=None), {}, 200, None),
    # what OpenAI's schema lets be null, and an answer's message sent back, are accepted as such
    ("nulls-where-openai-allows", "POST", CHAT, chat(n=None, stream=None, logprobs=None, ignore_eos=None), {}, 200, None),
    ("nulls-completion", "POST", DONE, completion(echo=None, logprobs=None, n=None), {}, 200, None),
    ("answer-sent-back", "POST", CHAT, chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "refusal": None, "tool_calls": None, "function_call": None, "audio": None, "annotations": []}, {"role": "user", "content": "c"}]), {}, 200, None),
    ("null-for-another-endpoints-field", "POST", CHAT, chat(echo=None), {}, 400, "echo"),
    ("answer-with-an-empty-list-refusal", "POST", CHAT, chat(messages=[{"role": "assistant", "content": "b", "refusal": []}]), {}, 400, "messages.0.refusal"),
    ("answer-with-a-refusal", "POST", CHAT, chat(messages=[{"role": "assistant", "content": "b", "refusal": "no"}]), {}, 400, "messages.0.refusal"),
    ("answer-with-tool-calls", "POST", CHAT, chat(messages=[{"role": "assistant", "content": "b", "tool_calls": [{"id": "1"}]}]), {}, 400, "messages.0.tool_calls"),
    ("stream_options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}), {}, 400, "stream_options"),
    ("stream_options-obfuscation-asked", "POST", CHAT, chat(stream=True, stream_options={"include_obfuscation": True}), {}, 400, "stream_options.include_obfuscation"),
    ("message-name-too-long", "POST", CHAT, chat(messages=[{"role": "user", "content": "hi", "name": "n" * 257}]), {}, 400, "messages.0.name"),
    ("response_format-strict-string", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": "yes"}}), {}, 400, "response_format.json_schema.strict"),
    ("response_format-strict-int", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": 1}}), {}, 400, "response_format.json_schema.strict"),
    ("response_format-name-with-space", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "has space", "schema": {"type": "object"}}}), {}, 400, "response_format.json_schema.name"),
    ("suffix", "POST", DONE, completion(suffix="end"), {}, 400, "suffix"),
    ("best_of-larger-than-n", "POST", DONE, completion(best_of=3), {}, 400, "best_of"),
    ("unknown-field", "POST", CHAT, chat(use_beam_search=True), {}, 400, "use_beam_search"),
    ("repetition_penalty-zero", "POST", CHAT, chat(repetition_penalty=0), {}, 400, "repetition_penalty"),
    ("repetition_penalty-tiny-sampled", "POST", CHAT, chat(repetition_penalty=1e-300, temperature=1.0), {}, 400, "repetition_penalty"),
    ("repetition_penalty-tiny-completion", "POST", DONE, completion(repetition_penalty=1e-30, temperature=1.0), {}, 400, "repetition_penalty"),
    ("min_p-string", "POST", DONE, completion(min_p="0.1"), {}, 400, "min_p"),
    ("min_tokens-over-max", "POST", DONE, completion(min_tokens=50, max_tokens=5), {}, 400, "min_tokens"),
    ("min_tokens-with-a-grammar", "POST", CHAT, chat(min_tokens=2, response_format={"type": "json_object"}), {}, 400, "min_tokens"),
    ("min_tokens-with-tools", "POST", CHAT, chat(min_tokens=2, tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required"), {}, 400, "min_tokens"),
    ("unknown-field-typo", "POST", CHAT, chat(max_token=5), {}, 400, "max_token"),
    ("response_format-unknown-type", "POST", CHAT, chat(response_format={"type": "xml"}), {}, 400, "response_format.type"),
    ("response_format-schema-endless", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": {"$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"]}}}}}), {}, 400, "response_format"),
    ("response_format-schema-only-itself", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}}), {}, 400, "response_format"),
    ("response_format-schema-missing", "POST", CHAT, chat(response_format={"type": "json_schema"}), {}, 400, "response_format"),
    ("response_format-choice-empty", "POST", CHAT, chat(response_format={"type": "choice", "choices": []}), {}, 400, "response_format.choices"),
    ("response_format-bad-regex", "POST", CHAT, chat(response_format={"type": "regex", "regex": "(("}), {}, 400, "response_format"),
    ("response_format-bad-schema", "POST", CHAT, chat(response_format={ "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}, } ), {}, 400, "response_format"),
    ("response_format-string", "POST", CHAT, chat(response_format="json"), {}, 400, "response_format"),
    # messages
    ("messages-missing", "POST", CHAT, chat(messages=...), {}, 400, "messages"),
    ("messages-empty", "POST", CHAT, chat(messages=[]), {}, 400, "messages"),
    ("messages-not-list", "POST", CHAT, chat(messages="Hi"), {}, 400, "messages"),
    ("message-not-object", "POST", CHAT, chat(messages=["Hi"]), {}, 400, "messages.0"),
    ("message-role-wizard", "POST", CHAT, message(role="wizard"), {}, 400, "messages.0.role"),
    ("message-tool-call-id-on-user", "POST", CHAT, message(tool_call_id="call_1"), {}, 400, "messages.0.tool_call_id"),
    ("message-tool-without-tool-call-id", "POST", CHAT, chat(messages=[{"role": "user", "content": "Hi"}, {"role": "tool", "content": "18 C"}]), {}, 400, "messages.1.tool_call_id"),
    ("message-tool-call-id-null", "POST", CHAT, chat(messages=[{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": None, "content": "18 C"}]), {}, 400, "messages.1.tool_call_id"),
    ("message-tool-answers-no-call", "POST", CHAT, chat(messages=[{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]), {}, 400, "messages.1.tool_call_id"),
    ("message-tool-answers-a-call-twice", "POST", CHAT, chat(messages=[{"role": "user", "content": "Hi"}, CALLED, TOOL_RESULT, TOOL_RESULT]), {}, 400, "messages.3.tool_call_id"),
    ("message-call-left-unanswered", "POST", CHAT, chat(messages=[{"role": "user", "content": "Hi"}, CALLED, {"role": "user", "content": "and?"}]), {}, 400, "messages.2"),
    ("message-call-ids-twice", "POST", CHAT, chat(messages=[{"role": "user", "content": "Hi"}, CALLED | {"tool_calls": CALLED["tool_calls"] * 2}, TOOL_RESULT]), {}, 400, "messages.1.tool_calls"),
    ("message-call-arguments-nested-deep", "POST", CHAT, chat(messages=[{"role": "user", "content": "Hi"}, called("[" * 1_500 + "]" * 1_500), TOOL_RESULT], max_tokens=2, prompt_template="raw"), {}, 200, None),
    ("message-call-arguments-lone-surrogate", "POST", CHAT, chat(messages=[{"role": "user", "content": "Hi"}, called('{"x": "\\ud800"}'), TOOL_RESULT], max_tokens=2, prompt_template="raw"), {}, 200, None),
    ("message-call-last-unanswered", "POST", CHAT, chat(messages=[{"role": "user", "content": "Hi"}, CALLED]), {}, 400, "messages"),
    ("tokenize-call-left-unanswered", "POST", "/tokenize", {"messages": [{"role": "user", "content": "Hi"}, CALLED, {"role": "user", "content": "and?"}]}, {}, 400, "messages.2"),
    ("message-role-missing", "POST", CHAT, chat(messages=[{"content": "Hi"}]), {}, 400, "messages.0.role"),
    ("message-content-int", "POST", CHAT, message(content=5), {}, 400, "messages.0.content"),
    ("message-content-null", "POST", CHAT, message(content=None), {}, 400, "messages.0.content"),
    ("message-content-missing", "POST", CHAT, chat(messages=[{"role": "user"}]), {}, 400, "messages.0.content"),
    ("message-image-part", "POST", CHAT, message(content=[{"type": "image_url", "image_url": {"url": "http://x"}}]), {}, 400, "messages.0.content"),
    ("message-content-empty-parts", "POST", CHAT, message(content=[]), {}, 400, "messages.0.content"),
    ("message-part-without-text", "POST", CHAT, message(content=[{"type": "text"}]), {}, 400, "messages.0.content"),
    ("message-unknown-key", "POST", CHAT, message(tool_calls=[]), {}, 400, "messages.0.tool_calls"),
    ("last-message-not-user", "POST", CHAT, chat(messages=[{"role": "assistant", "content": "Hi"}]), {}, 400, "messages"),
    ("template_fields-unknown", "POST", CHAT, chat(template_fields={"nope": "x"}), {}, 400, "template_fields"),
    ("template_fields-not-strings", "POST", CHAT, chat(template_fields={"review": 5}), {}, 400, "template_fields.review"),
    ("template_fields-on-base", "POST", CHAT, chat(model="base", template_fields={"x": "y"}), {}, 400, "template_fields"),
    ("prompt_template-unknown", "POST", CHAT, chat(prompt_template="maybe"), {}, 400, "prompt_template"),
    ("two-field-template-needs-fields", "POST", CHAT, chat(model="beta"), {}, 400, "template_fields"),
    # prompts
    ("prompt-missing", "POST", DONE, completion(prompt=...), {}, 400, "prompt"),
    ("prompt-empty", "POST", DONE, completion(prompt=""), {}, 400, "prompt"),
    ("prompt-int", "POST", DONE, completion(prompt=5), {}, 400, "prompt"),
    ("prompt-empty-list", "POST", DONE, completion(prompt=[]), {}, 400, "prompt"),
    ("prompt-too-many", "POST", DONE, completion(prompt=["a"] * 17), {}, 400, "prompt"),
    ("prompt-token-out-of-vocab", "POST", DONE, completion(prompt=[1, 10**7]), {}, 400, "prompt"),
    ("prompt-negative-token", "POST", DONE, completion(prompt=[-1]), {}, 400, "prompt"),
    ("prompt-mixed-list", "POST", DONE, completion(prompt=["a", 1]), {}, 400, "prompt"),
    ("prompt-token-float", "POST", DONE, completion(prompt=[1, 2.0]), {}, 400, "prompt"),
    ("prompt-token-null", "POST", DONE, completion(prompt=[1, None]), {}, 400, "prompt"),
    ("prompt-token-bool", "POST", DONE, completion(prompt=[True]), {}, 400, "prompt"),
    ("prompt-token-nested-float", "POST", DONE, completion(prompt=[[1], [1, 2.5]]), {}, 400, "prompt"),
    ("prompt_template-on-completions", "POST", DONE, completion(prompt_template="raw"), {}, 400, "prompt_template"),
    ("prompt-over-the-context", "POST", DONE, completion(prompt="word " * 9000), {}, 400, "max_tokens"),
    # models
    ("model-unknown", "POST", CHAT, chat(model="nope"), {}, 404, "model"),
    ("model-empty", "POST", CHAT, chat(model=""), {}, 400, "model"),
    ("model-int", "POST", CHAT, chat(model=5), {}, 400, "model"),
    ("model-base-colon-unknown", "POST", CHAT, chat(model="base:nope"), {}, 404, "model"),
    ("model-retrieve-unknown", "GET", "/v1/models/nope", None, {}, 404, "model"),
    # bodies and routes
    ("empty-body", "POST", CHAT, b"", {}, 400, None),
    ("body-array", "POST", CHAT, b"[]", {}, 400, None),
    ("body-string", "POST", CHAT, b'"hi"', {}, 400, None),
    ("body-null", "POST", CHAT, b"null", {}, 400, None),
    ("content-type-text-plain", "POST", CHAT, json.dumps(OK_CHAT).encode(), {"content-type": "text/plain"}, 415, None),
    ("content-type-form", "POST", CHAT, json.dumps(OK_CHAT).encode(), {"content-type": "application/x-www-form-urlencoded"}, 415, None),
    ("content-type-multipart-admin", "POST", "/v1/adapters", b'{"name": "x", "path": "gamma"}', AUTH | {"content-type": "multipart/form-data; boundary=b"}, 415, None),
    ("content-type-json-charset", "POST", CHAT, json.dumps(OK_CHAT).encode(), {"content-type": "application/json; charset=utf-8"}, 200, None),
    ("content-type-json-suffix", "POST", DONE, json.dumps(OK_DONE).encode(), {"content-type": "application/vnd.x+json"}, 200, None),
    ("content-encoding-gzip", "POST", CHAT, json.dumps(OK_CHAT).encode(), {"content-encoding": "gzip"}, 415, None),
    ("content-type-of-30k-characters", "POST", CHAT, json.dumps(OK_CHAT).encode(), {"content-type": "text/" + "x" * 30_000}, 415, None),
    ("content-encoding-of-30k-characters", "POST", CHAT, json.dumps(OK_CHAT).encode(), {"content-encoding": "x" * 30_000}, 415, None),
    ("truncated-json", "POST", CHAT, b'{"model": "alpha", "messages": [', {}, 400, None),
    ("body-over-the-limit", "POST", CHAT, b"x" * 70_000, {}, 413, None),
    ("get-on-chat", "GET", CHAT, None, {}, 405, None),
    ("put-on-completions", "PUT", DONE, b"{}", {}, 405, None),
    ("unknown-v1-route", "GET", "/v1/embeddings", None, {}, 404, None),
    ("unknown-route", "GET", "/nope", None, {}, 404, None),
    ("delete-adapters-slash", "DELETE", "/v1/adapters/", None, AUTH, 404, None),
    ("post-models", "POST", "/v1/models", b"{}", {}, 405, None),
    # admin
    ("admin-no-token", "POST", "/v1/adapters", {"name": "x", "path": "gamma"}, {}, 401, None),
    ("admin-wrong-token", "DELETE", "/v1/adapters/alpha", None, {"authorization": "Bearer nope"}, 401, None),
    ("admin-token-prefix", "DELETE", "/v1/adapters/alpha", None, {"authorization": f"Bearer {TOKEN[:-1]}"}, 401, None),
    ("admin-path-traversal", "POST", "/v1/adapters", {"name": "x", "path": "../../etc"}, AUTH, 403, "path"),
    ("admin-absolute-outside", "POST", "/v1/adapters", {"name": "x", "path": "/etc"}, AUTH, 403, "path"),
    ("admin-reserved-base", "POST", "/v1/adapters", {"name": "base", "path": "gamma"}, AUTH, 422, "name"),
    ("admin-reserved-fanout", "POST", "/v1/adapters", {"name": "fanout", "path": "gamma"}, AUTH, 422, "name"),
    ("admin-bad-slug", "POST", "/v1/adapters", {"name": "Bad Name", "path": "gamma"}, AUTH, 422, "name"),
    ("admin-already-loaded", "POST", "/v1/adapters", {"name": "alpha", "path": "gamma"}, AUTH, 409, "name"),
    ("admin-not-an-adapter", "POST", "/v1/adapters", {"name": "x", "path": "."}, AUTH, 422, None),
    ("admin-dora", "POST", "/v1/adapters", {"name": "x", "path": "dora"}, AUTH, 422, None),
    ("admin-rank-too-high", "POST", "/v1/adapters", {"name": "x", "path": "big"}, AUTH, 422, None),
    ("admin-unknown-field", "POST", "/v1/adapters", {"name": "x", "path": "gamma", "force": True}, AUTH, 400, "force"),
    ("admin-unload-unknown", "DELETE", "/v1/adapters/nope", None, AUTH, 404, None),
]
# fmt: on


@pytest.fixture(scope="module")
def server(hf_engine, registry_for, adapter_dirs, base_dir, tmp_path_factory):
    import shutil

    from conftest import LiveServer
    from helpers import make_peft_adapter

    root = tmp_path_factory.mktemp("hostile_root")
    shutil.copytree(adapter_dirs["beta"], root / "gamma")
    make_peft_adapter(
        base_dir, root / "dora", r=4, target_modules=["q_proj"], seed=3, use_dora=True
    )
    make_peft_adapter(base_dir, root / "big", r=16, target_modules=["q_proj"], seed=4)
    registry = registry_for.model_copy(deep=True)
    registry.server.max_body_bytes = 65_536
    registry.server.max_adapter_rank = 8
    app = create_api(hf_engine, registry, admin_token=TOKEN, adapter_root=root)
    live = LiveServer(app)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:  # one keep-alive connection
        yield c


def send(client, method, path, body, headers):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} | headers
    return client.request(method, path, content=content, headers=headers)


def test_there_are_over_a_hundred_cases():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "method", "path", "body", "headers", "status", "param"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_request_gets_its_4xx_in_openai_shape_and_serving_goes_on(
    client, name, method, path, body, headers, status, param
):
    response = send(client, method, path, body, headers)
    assert response.status_code == status, response.text[:500]
    if status != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] and error["type"] and error["code"] == status
        if param is not None:
            assert (error["param"] or "").startswith(param), error
        assert len(error["message"]) < 4096, "an error quotes what was sent, clipped"
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["ok"] is True


def test_an_empty_list_of_parts_is_named_as_one(client):
    """Of the union's two complaints (not a string; a list too short) the one about the list."""
    answer = client.post(CHAT, json=message(content=[]))
    assert answer.status_code == 400
    assert "at least 1" in answer.json()["error"]["message"], answer.text


@pytest.mark.parametrize(
    ("choice", "param", "words"),
    [
        ("sometimes", "tool_choice", "'none', 'auto' or 'required'"),
        ({"type": "function"}, "tool_choice.function", "required"),
        ({"type": "function", "function": {}}, "tool_choice.function.name", "required"),
    ],
)
def test_a_bad_tool_choice_is_named_without_pydantics_class_names(client, choice, param, words):
    tools = [{"type": "function", "function": {"name": "f"}}]
    answer = client.post(CHAT, json=OK_CHAT | {"tools": tools, "tool_choice": choice})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert "NamedToolChoice" not in answer.text


MANY = 300_000


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{}] * MANY}, "messages"),
        ({"messages": [{"role": "user", "content": [{}] * MANY}]}, "messages.0.content"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{}] * MANY}]},
         "messages.0.tool_calls"),
        ({"stop": [5] * MANY}, "stop"),
        ({"logit_bias": {str(i): "x" for i in range(MANY)}}, "logit_bias"),
        ({"template_fields": {str(i): 5 for i in range(MANY)}}, "template_fields"),
    ],
)  # fmt: skip
def test_a_body_of_many_bad_items_is_one_error_not_one_per_item(client, fields, param):
    """Pydantic reports every bad item, and turning 600,000 of them into a message held the
    event loop for seconds: a list or object over ``MAX_LIST`` is refused before its items."""
    with pytest.raises(pydantic.ValidationError) as refused:
        ChatBody.model_validate(OK_CHAT | fields)
    assert refused.value.error_count() <= 2  # a union's two branches at most
    message, named = validation_message(refused.value.errors())
    assert named == param and str(MAX_LIST) in message, message
    if param == "messages":  # through HTTP (this server's bodies are 64 KiB at most)
        answer = client.post(CHAT, json=OK_CHAT | {"messages": [{}] * (MAX_LIST + 1)})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages"


def test_a_key_of_the_clients_is_kept_in_the_errors_param_and_no_class_is_named(client):
    answer = client.post(CHAT, json=OK_CHAT | {"template_fields": {"ChatMessage": 5}})
    assert answer.json()["error"]["param"] == "template_fields.ChatMessage", answer.text
    tools = [{"type": "function", "function": {"name": "f"}}]
    choice = {"type": "function", "function": None}
    answer = client.post(CHAT, json=OK_CHAT | {"tools": tools, "tool_choice": choice})
    assert answer.status_code == 400 and "instance of" not in answer.text, answer.text


def test_only_a_body_with_a_lone_surrogate_is_walked_for_its_path():
    """Found at C speed; the walk that names the field runs only then (off the event loop)."""
    from engine.api.routes import holds_a_lone_surrogate, unreadable

    for text, lone in [
        ('{"a": [[["x"]]]}', False),
        ('{"a": "\\ud83d\\ude00"}', False),  # a pair: an emoji
        ('{"a": ["\\ud83d"]}', True),
        ('{"a": {"b": ["ok", "\\udc00"]}}', True),
    ]:
        body = json.loads(text)
        assert holds_a_lone_surrogate(text, body) is lone, text
        assert (unreadable(body) is not None) is lone
    assert unreadable(json.loads('{"a": {"b": ["ok", "\\udc00"]}}'))[0] == "a.b.1"


def test_grammars_are_checked_off_the_event_loop(client, server, monkeypatch):
    """llguidance's check of a schema may take seconds: it runs in a thread, not the loop's."""
    import threading

    from engine.api import routes, tools

    threads = []

    def recording(check):
        def wrapper(constraint):
            threads.append(threading.get_ident())
            return check(constraint)

        return wrapper

    monkeypatch.setattr(routes, "grammar_problem", recording(routes.grammar_problem))
    monkeypatch.setattr(tools, "grammar_problem", recording(tools.grammar_problem))
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert client.post(CHAT, json=OK_CHAT | {"response_format": fmt}).status_code == 200
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    chat = OK_CHAT | {"tools": [tool], "tool_choice": "required"}
    assert client.post(CHAT, json=chat).status_code == 200
    assert len(threads) == 2 and server.thread.ident not in threads


def test_a_body_without_a_content_type_is_read_as_json(client):
    """As FastAPI reads one: only a Content-Type that names another format is refused."""
    response = client.post(CHAT, content=json.dumps(OK_CHAT).encode())
    assert "content-type" not in response.request.headers
    assert response.status_code == 200, response.text


UNPARSABLE_HTTP = {
    "request-line-garbage": b"GARBAGE\r\n\r\n",
    "content-length-not-a-number": (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: ten\r\n\r\n"
    ),
    "header-without-a-colon": b"GET /health HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n",
    "chunk-size-not-hex": (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        b"zz\r\n{}\r\n0\r\n\r\n"
    ),
}


def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a fresh connection and read the answer until the server closes it."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        return read_answer(s)


def read_answer(s) -> tuple[int, dict[str, str], bytes]:
    """The answer on socket ``s``, read until the server closes the connection."""
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = dict(f.lower().split(": ", 1) for f in fields)
    return int(status_line.split(" ")[1]), headers, body


@pytest.mark.parametrize("name", UNPARSABLE_HTTP)
def test_bytes_that_are_not_http_get_a_400_in_openai_shape_and_serving_goes_on(
    server, client, name
):
    status, headers, body = raw_exchange(server.port, UNPARSABLE_HTTP[name])
    assert status == 400 and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert "could not be parsed" in error["message"]
    assert client.get("/health").json()["ok"] is True


def test_a_body_in_a_transfer_coding_other_than_chunked_is_a_415_and_chunked_is_served(server):
    body = json.dumps(OK_CHAT).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ntransfer-encoding: ")  # fmt: skip
    chunks = b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    status, _, answer = raw_exchange(server.port, head + b"gzip, chunked" + chunks)
    error = json.loads(answer)["error"]
    assert status == 415 and error["code"] == 415, answer
    assert error["message"].startswith("Transfer-Encoding 'gzip, chunked' is not supported")
    status, _, answer = raw_exchange(server.port, head + b"chunked" + chunks)
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"], answer


def websocket_library() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("websockets", "wsproto"))


@pytest.mark.skipif(not websocket_library(), reason="uvicorn answers upgrades as plain HTTP")
@pytest.mark.parametrize("path", ["/v1/realtime?model=gpt-realtime", CHAT, "/"])
def test_a_websocket_handshake_gets_a_404_in_openai_shape_not_an_empty_403(server, client, path):
    handshake = (f"GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade"
                 "\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "sec-websocket-version: 13\r\n\r\n")  # fmt: skip
    status, headers, body = raw_exchange(server.port, handshake.encode())
    assert status == 404 and headers["content-type"] == "application/json", body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "not_found_error" and error["code"] == 404
    assert error["message"].startswith(f"no WebSocket endpoint at {path.partition('?')[0]}:")
    assert client.get("/health").json()["ok"] is True


def test_the_metrics_count_every_status_that_happened(client):
    picked = {"model-unknown", "truncated-json", "body-over-the-limit", "admin-no-token",
              "admin-path-traversal", "admin-reserved-base", "max_tokens-huge"}  # fmt: skip
    statuses = {
        send(client, method, path, body, headers).status_code
        for name, method, path, body, headers, _, _ in CASES
        if name in picked
    }
    assert statuses == {400, 401, 403, 404, 413, 422}
    text = client.get("/metrics").text
    assert all(f'status="{status}"' in text for status in statuses), text[-3000:]


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        ([1, None], "prompt[1] is None"),
        ([[1], [1, 2.5]], "prompt[1][1] is 2.5"),
        (["a", 1], "prompt[0] is 'a'"),
    ],
)
def test_a_bad_token_array_names_its_bad_item(client, prompt, named):
    response = send(client, "POST", DONE, completion(prompt=prompt), {})
    assert response.status_code == 400 and named in response.json()["error"]["message"]
