"""Tool calls (``tools``, ``tool_choice``) through the official OpenAI SDK against a live server
on the CPU backend: the answer constrained to the call's JSON, streamed and not, sent back."""

from __future__ import annotations

import json

import httpx
import openai
import pydantic
import pytest
from helpers import WEATHER_TOOL

from engine.api import create_api
from engine.api.protocol import ChatBody
from engine.api.tools import CallScanner, ToolPlan, ToolStream, tool_plan
from engine.interface import Chunk

BASE = "SmolLM2-135M-Instruct"
WEATHER = WEATHER_TOOL
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(hf_engine, registry_for):
    from conftest import LiveServer

    live = LiveServer(create_api(hf_engine, registry_for))
    yield live
    live.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def ask(client, **fields):
    fields = {"model": BASE, "messages": ASK, "temperature": 0, "max_tokens": 80} | fields
    return client.chat.completions.create(**fields)


def weather_arguments(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in {"c", "f"}
    assert isinstance(args["city"], str) and len(args["city"]) <= 20
    return args


def test_a_named_function_is_called_with_arguments_its_schema_allows(client):
    answer = ask(client, tools=[WEATHER, CLOCK], tool_choice=NAMED)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    weather_arguments(call.function.arguments)


def test_required_calls_are_among_the_tools_and_one_without_parallel_calls(client):
    answer = ask(client, tools=[WEATHER, CLOCK], tool_choice="required", n=2, seed=1,
                 temperature=0.8, parallel_tool_calls=False)  # fmt: skip
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            weather_arguments(call.function.arguments)
        else:
            assert call.function.name == "get_time" and set(args) == {"zone"}


def streamed_calls(stream, text_too: bool = False) -> tuple[dict, str | None]:
    """The SDK's tool-call deltas put together by index, as a client does (``text_too``: an
    answer's text under ``"text"``, else there is none)."""
    calls, finish = {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        if text_too and choice.delta.content:
            calls["text"] = calls.get("text", "") + choice.delta.content
        else:
            assert choice.delta.content is None  # as OpenAI's: a tool-call answer has no text
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] = (delta.function.name if delta.function else None) or call["name"]
            call["arguments"] += (delta.function.arguments if delta.function else None) or ""
        finish = choice.finish_reason or finish
    return calls, finish


@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_streamed_calls_join_to_the_non_streamed_ones(client, choice):
    whole = ask(client, tools=[WEATHER, CLOCK], tool_choice=choice).choices[0]
    calls, finish = streamed_calls(ask(client, tools=[WEATHER, CLOCK], tool_choice=choice,
                                       stream=True))  # fmt: skip
    assert finish == whole.finish_reason
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == expected
    assert all(c["id"] and c["id"].startswith("call_") for c in calls.values())


def test_an_answer_with_calls_and_the_tools_results_go_into_the_next_request(client, server):
    """The SDK's multi-turn idiom: the answer appended as it came, then each call's result."""
    answer = ask(client, tools=[WEATHER], tool_choice="required").choices[0].message
    results = [{"role": "tool", "tool_call_id": c.id, "content": "18 C and sunny"}
               for c in answer.tool_calls]  # fmt: skip
    messages = [*ASK, answer.model_dump(), *results]
    follow_up = ask(client, messages=messages, max_tokens=8)
    assert follow_up.choices[0].message.content
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    seen = httpx.post(f"{server.url}/detokenize", json={"tokens": prompt}).json()["prompt"]
    assert '"name": "get_weather"' in seen and "18 C and sunny" in seen  # what the model read


def test_calls_cut_by_max_tokens_come_back_as_text(client):
    choice = ask(client, tools=[WEATHER], tool_choice="required", max_tokens=4).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.tool_calls is None and choice.message.content.startswith("[")


def test_required_calls_stream_their_arguments_as_they_are_written(client):
    """As OpenAI's: a call's id and name first, then its arguments in pieces, not one event at
    the end of the answer."""
    chunks = [c for c in ask(client, tools=[WEATHER, CLOCK], tool_choice="required", stream=True)
              if c.choices]  # fmt: skip
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    heads = [d for d in deltas if d.id]
    assert heads and all(d.function.name and d.function.arguments == "" for d in heads)
    assert len(deltas) - len(heads) >= 3  # the arguments in at least three pieces
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("share", [0.1, 0.4, 0.7, 0.95])
def test_required_calls_cut_by_max_tokens_are_the_same_streamed_and_not(client, share):
    """Cut after a call's name: that call with the arguments written so far (as a named
    function's), ``length``; cut before any name: the text. Streamed the same."""
    fields = {"tools": [WEATHER, CLOCK], "tool_choice": "required"}
    uncut = ask(client, **fields).usage.completion_tokens
    fields["max_tokens"] = max(1, min(uncut - 1, round(uncut * share)))
    whole = ask(client, **fields).choices[0]
    calls, finish = streamed_calls(ask(client, stream=True, **fields), text_too=True)
    assert finish == whole.finish_reason == "length"
    if whole.message.tool_calls is None:
        assert calls == {"text": whole.message.content}
        return
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [WEATHER], "stop": ["]"]}, "stop"),  # auto: a call's JSON may come
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        (  # arguments are a JSON object, as OpenAI's
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        # a stop string would cut the calls' JSON (it was answered as a whole call)
        ({"tools": [WEATHER], "tool_choice": NAMED, "stop": ["}"]}, "stop"),
        ({"tools": [WEATHER], "tool_choice": "required", "stop": "name"}, "stop"),
    ],
)
def test_tool_requests_it_cannot_honour_are_a_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, **fields)
    assert refused.value.param == param


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "f"}}, "required"])
def test_arguments_are_an_object_when_the_schema_leaves_its_type_out(client, server, choice):
    """A bias towards a string's opening quote cannot make the arguments a string."""
    untyped = {
        "properties": {"a": {"type": "string", "maxLength": 4}},
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "f", "parameters": untyped}}
    [quote] = httpx.post(f"{server.url}/tokenize", json={"prompt": '"'}).json()["tokens"]
    answer = ask(client, tools=[tool], tool_choice=choice, parallel_tool_calls=False,
                 logit_bias={str(quote): 100}, max_tokens=60).choices[0]  # fmt: skip
    [call] = answer.message.tool_calls
    assert isinstance(json.loads(call.function.arguments), dict)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)


class Trip(pydantic.BaseModel):
    origin: City
    destination: City


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "Trip"}}, "required"])
def test_a_schema_with_defs_and_refs_is_served_under_any_tool_choice(client, choice):
    """The SDK's ``pydantic_function_tool`` of nested models: ``$defs`` and ``#/$defs/…`` refs
    (under ``required`` each function's refs point into its own schema)."""
    answer = client.chat.completions.parse(
        model=BASE, messages=ASK, tools=[openai.pydantic_function_tool(Trip)], tool_choice=choice,
        parallel_tool_calls=False, temperature=0, max_tokens=120,
    )  # fmt: skip
    [call] = answer.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Trip)


def test_tool_choice_none_answers_in_text(client):
    choice = ask(client, tools=[WEATHER], tool_choice="none", max_tokens=6).choices[0]
    assert choice.message.tool_calls is None and choice.message.content


def auto_plan(parallel: bool = True) -> ToolPlan:
    body = ChatBody.model_validate({"model": "m", "messages": ASK, "tools": [WEATHER, CLOCK],
                                    "parallel_tool_calls": parallel})  # fmt: skip
    plan = tool_plan(body)
    assert plan.auto and body.response_format.type == "text"  # no grammar: the model chooses
    return plan


PARIS = '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}]'


@pytest.mark.parametrize(
    "text, called",
    [
        (PARIS, True),
        (f"  {PARIS}\n", True),
        ("It is sunny in Paris.", False),
        ('[{"name": "get_moon", "parameters": {}}]', False),  # not a listed function
        ('[{"name": "get_weather", "parameters": "Paris"}]', False),  # arguments not an object
        ('[{"name": "get_weather", "parameters": {}, "why": 1}]', False),
        ("[]", False),
        ('["get_weather"]', False),
        (PARIS[:-2], False),  # not whole
        ('[{"name": ["get_weather"], "parameters": {}}]', False),  # a name that is not text
        ('[{"name": "get_weather", "parameters": {"city": NaN}}]', False),  # not JSON
        ('[{"name": "get_weather", "parameters": {"x": 1e999}}]', False),  # infinite
    ],
)
def test_under_auto_an_answer_is_calls_only_when_it_is_whole_calls_of_the_tools(text, called):
    message, finish = auto_plan().message(text, "stop")
    if called:
        [call] = message["tool_calls"]
        assert message["content"] is None and finish == "tool_calls"
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    else:
        assert message == {"role": "assistant", "content": text, "refusal": None}
        assert finish == "stop"


def test_auto_with_parallel_calls_off_takes_one_call_and_no_more():
    two = PARIS[:-1] + ', {"name": "get_time", "parameters": {"zone": "UTC"}}]'
    assert auto_plan(parallel=True).message(two, "stop")[1] == "tool_calls"
    assert auto_plan(parallel=False).message(two, "stop") == (
        {"role": "assistant", "content": two, "refusal": None}, "stop",
    )  # fmt: skip
    assert "one call at most" in auto_plan(parallel=False).instructions()


def streamed(plan, pieces: list[str], finish: str = "stop") -> tuple[list[dict], str | None]:
    stream, deltas = ToolStream(plan), []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        deltas += stream.deltas(Chunk(piece, [], finish_reason=finish if last else None))
    return deltas, stream.finish_reason(finish)


def test_auto_streams_text_as_it_comes_and_holds_back_an_answer_that_opens_with_a_bracket():
    deltas, finish = streamed(auto_plan(), [" ", "It is", " sunny", "."])
    assert deltas == [{"content": " It is"}, {"content": " sunny"}, {"content": "."}]
    assert finish == "stop"
    pieces = [PARIS[:10], PARIS[10:30], PARIS[30:]]
    deltas, finish = streamed(auto_plan(), pieces)
    [only] = deltas
    assert only["tool_calls"][0]["function"]["name"] == "get_weather" and finish == "tool_calls"
    deltas, finish = streamed(auto_plan(), ["[1, ", "2]"])  # a bracket, but no calls
    assert deltas == [{"content": "[1, 2]"}] and finish == "stop"
    deltas, finish = streamed(auto_plan(), [PARIS[:20]], finish="length")
    assert deltas == [{"content": PARIS[:20]}] and finish == "length"


def test_tools_without_a_choice_are_auto_through_the_sdk_streamed_as_not(client, server):
    """OpenAI's default with tools: the SDK's plain call works; the answer is text or calls, the
    same streamed and not (greedy), and the model was shown the functions."""
    whole = ask(client, tools=[WEATHER]).choices[0]
    parts = list(ask(client, tools=[WEATHER], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    calls = [t for c in parts if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert parts[-1].choices[0].finish_reason == whole.finish_reason
    if whole.message.tool_calls:
        assert whole.finish_reason == "tool_calls" and whole.message.content is None
        assert [c.function.name for c in calls] == [
            c.function.name for c in whole.message.tool_calls
        ]
    else:
        assert whole.finish_reason in {"stop", "length"} and text == whole.message.content
        assert not calls
    shown = httpx.post(f"{server.url}/tokenize", json={"messages": ASK}).json()["count"]
    assert whole_prompt_tokens(client) > shown  # the functions' instructions were in the prompt


@pytest.mark.parametrize(
    "fields",
    [{"tool_choice": "required"}, {"tool_choice": NAMED}, {}],  # {}: auto
)
def test_streamed_logprobs_arrive_with_the_deltas_that_carry_their_tokens(client, fields):
    """Logprobs of text held back (``required``'s answer; an ``auto`` answer opening with ``[``)
    go out with that text or the calls parsed from it, not ahead of it in empty deltas; every
    token's logprob arrives once, as in the answer that is not streamed."""
    fields |= {"tools": [WEATHER, CLOCK], "logprobs": True, "top_logprobs": 2}
    whole = ask(client, **fields).choices[0]
    parts = [c.choices[0] for c in ask(client, stream=True, **fields) if c.choices]
    with_logprobs = [p for p in parts if p.logprobs is not None]
    for part in with_logprobs:
        carried = part.delta.content or part.delta.tool_calls or part.finish_reason
        assert carried, "logprobs in an event that carries nothing"
    tokens = [t.token for p in with_logprobs for t in p.logprobs.content]
    assert tokens and tokens == [t.token for t in whole.logprobs.content]


TWO_CALLS = (
    '[ {"name":"get_weather" , "parameters":{"city": "Pa}\\"ris{", "unit": "c"}},\n'
    '{"parameters": {"zone": "[UTC]"}, "name": "get_time"} ]'
)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, len(TWO_CALLS)])
def test_the_scanner_reads_required_calls_the_same_in_any_pieces(piece):
    """Names once whole, arguments as written (braces and quotes inside strings are text),
    arguments written before their name told with it; whatever the pieces the text comes in."""
    scanner, told = CallScanner(), []
    for at in range(0, len(TWO_CALLS), piece):
        told += scanner.feed(TWO_CALLS[at : at + piece])
    assert scanner.done
    weather = '{"city": "Pa}\\"ris{", "unit": "c"}'
    assert [(c.name, c.arguments) for c in scanner.calls] == [
        ("get_weather", weather), ("get_time", '{"zone": "[UTC]"}'),
    ]  # fmt: skip
    assert [name for _, name, _ in told if name] == ["get_weather", "get_time"]
    assert "".join(a for i, _, a in told if i == 0) == weather
    assert [t for t in told if t[0] == 1] == [(1, "get_time", '{"zone": "[UTC]"}')]


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "f"}',
        '[{"name": 5}]',
        '[{"why": 1}]',
        '[{"name": "f", "parameters": 3}]',
        '[{"name": "f", "parameters": {},}]',  # a trailing comma
        '[{"name": "f"}]',  # no arguments
        '[{"name": "f", "name": "g", "parameters": {}}]',
        '[{"name": "f", "parameters": {}, "parameters": {}}]',
        "[{}]",
    ],
)
def test_the_scanner_stops_at_text_that_is_not_calls(text):
    scanner = CallScanner()
    scanner.feed(text)
    assert not scanner.done and scanner.state == "broken"


def test_a_required_answer_that_is_not_calls_streams_as_its_text():
    plan = ToolPlan([ChatBody.model_validate({"model": "m", "tools": [WEATHER]}).tools[0]], None)
    deltas, finish = streamed(plan, ["It is", " sunny"])
    assert deltas == [{"content": "It is sunny"}] and finish == "stop"
    assert plan.message("It is sunny", "stop") == (
        {"role": "assistant", "content": "It is sunny", "refusal": None}, "stop",
    )  # fmt: skip


def test_a_held_back_answer_sends_keepalive_comments_that_the_sdk_skips(
    client, server, monkeypatch
):
    """An ``auto`` answer opening with ``[`` is held until whole; meanwhile SSE comments keep a
    proxy from cutting the stream (every held token here: the interval set to 0)."""
    from engine.api import tools

    monkeypatch.setattr(tools, "HELD_KEEPALIVE_S", 0.0)
    [bracket] = httpx.post(f"{server.url}/tokenize", json={"model": BASE, "prompt": "["}).json()[
        "tokens"
    ]
    fields = {"tools": [WEATHER], "logit_bias": {str(bracket): 100}, "max_tokens": 6}
    body = {"model": BASE, "messages": ASK, "stream": True} | fields
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as raw:
        lines = list(raw.iter_lines())
    assert sum(line.startswith(": ") for line in lines) >= 3
    parts = [c.choices[0] for c in ask(client, stream=True, **fields) if c.choices]
    text = "".join(p.delta.content or "" for p in parts)
    assert text == "[" * 6 == ask(client, **fields).choices[0].message.content
    assert parts[-1].finish_reason == "length"


def whole_prompt_tokens(client) -> int:
    return ask(client, tools=[WEATHER], max_tokens=1).usage.prompt_tokens


def test_arguments_with_an_escaped_lone_surrogate_stay_json_a_response_can_carry():
    text = '[{"name": "get_weather", "parameters": {"city": "\\ud800Paris", "unit": "c"}}]'
    message, finish = auto_plan().message(text, "stop")
    arguments = message["tool_calls"][0]["function"]["arguments"]
    arguments.encode("utf-8")  # the response can be written
    assert json.loads(arguments)["city"] == "\ud800Paris" and finish == "tool_calls"


def test_under_auto_an_adapters_default_grammar_does_not_hold_the_answer():
    """A classifier's ``response_format`` default (its labels) would make calls unwritable."""
    from types import SimpleNamespace

    from engine.registry import GenerationDefaults
    from engine.sampling import resolve

    labels = GenerationDefaults(response_format={"type": "choice", "choices": ["fresh", "rotten"]})
    spec = SimpleNamespace(generation=labels)
    assert resolve(spec).constraint is not None
    body = ChatBody.model_validate({"model": "m", "messages": ASK, "tools": [WEATHER]})
    tool_plan(body)
    assert resolve(spec, response_format=body.response_format).constraint is None


def test_calls_to_an_adapter_are_not_cut_by_its_short_default_length(client):
    """``alpha``'s default ``max_tokens`` (12) is sized for its labels: a request with tools
    that leaves ``max_tokens`` out gets the base's default instead, as it gets no default stop
    strings, so the calls come back whole."""
    fields = {"model": "alpha", "messages": ASK, "temperature": 0}
    choice = client.chat.completions.create(
        **fields, tools=[WEATHER], tool_choice="required"
    ).choices[0]
    assert choice.finish_reason == "tool_calls"
    weather_arguments(choice.message.tool_calls[0].function.arguments)
    plain = client.chat.completions.create(**fields)  # no tools: its own default
    assert plain.usage.completion_tokens <= 12
