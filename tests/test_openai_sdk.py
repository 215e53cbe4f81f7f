"""The official ``openai`` SDK against the API on the CPU default: streaming with usage, errors
as the SDK's exceptions, structured output, logprobs, ``n``, penalties, seeds, and the inputs
OpenAI accepts (content parts, the developer role, token-array prompts)."""

from __future__ import annotations

import json
import math

import openai
import pytest
from openai import OpenAI

from engine.api import create_api

ADDRESS_SCHEMA = {
    "type": "object",
    "properties": {"number": {"type": "string"}, "street": {"type": "string"}},
    "required": ["number", "street"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(hf_engine, registry_for):
    from conftest import LiveServer

    live = LiveServer(create_api(hf_engine, registry_for))
    yield OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=300)
    live.stop()


def ask(client, content="Name a fruit.", model="base", **extra):
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model=model, messages=messages, **extra)


def test_streaming_with_usage_matches_the_whole_answer(client):
    whole = ask(client, max_tokens=12, temperature=0)
    chunks = list(ask(client, max_tokens=12, temperature=0, stream=True,
                      stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason in {"stop", "length"}


def test_errors_arrive_as_the_sdks_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(client, model="nope")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        ask(client, temperature=3)
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        ask(client, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice={"type": "function", "function": {"name": "g"}})  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="unknown field 'use_beam_search'"):
        ask(client, extra_body={"use_beam_search": True})
    with pytest.raises(openai.BadRequestError, match="maximum context length") as too_long:
        ask(client, max_tokens=100_000)  # as OpenAI and vLLM answer it, a 400
    assert too_long.value.param == "max_tokens"


def test_json_schema_output_parses_and_matches_the_schema(client):
    response = ask(
        client,
        content="Parse the address 12 Main Street into its number and street.",
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "address", "schema": ADDRESS_SCHEMA, "strict": True},
        },
    )
    parsed = json.loads(response.choices[0].message.content)
    assert set(parsed) == {"number", "street"}
    assert all(isinstance(v, str) for v in parsed.values())


def test_json_object_and_choice_constraints(client):
    obj = ask(client, content="Describe an apple.", max_tokens=40, temperature=0,
              response_format={"type": "json_object"})  # fmt: skip
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    yes_no = {"response_format": {"type": "choice", "choices": ["yes", "no"]}}
    choice = ask(client, content="Is the sky green?", max_tokens=8, temperature=0.9, seed=3,
                 extra_body=yes_no)  # fmt: skip
    assert choice.choices[0].message.content in {"yes", "no"}


def test_logprobs_and_top_logprobs_have_openais_shape(client):
    response = ask(client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    first = content[0]
    assert first.logprob <= 0 and len(first.top_logprobs) == 3
    assert first.top_logprobs[0].token == first.token  # greedy: the chosen token is the best
    assert math.isclose(first.top_logprobs[0].logprob, first.logprob, abs_tol=1e-5)
    assert bytes(first.bytes).decode() == first.token
    done = client.completions.create(model="base", prompt="The sky is", max_tokens=4,
                                     temperature=0, logprobs=2)  # fmt: skip
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == done.choices[0].text
    streamed = client.completions.create(model="base", prompt="The sky is", max_tokens=6,
                                         temperature=0, logprobs=1, stream=True)  # fmt: skip
    text, offsets, tokens = "", [], []
    for chunk in streamed:
        for choice in chunk.choices:
            if choice.logprobs:  # text_offset counts from the start of the choice's text
                offsets += choice.logprobs.text_offset
                tokens += choice.logprobs.tokens
            text += choice.text
    assert len(tokens) == 6 and "".join(tokens) == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(6)]
    hot = client.completions.create(model="base", prompt="1, 2, 3,", max_tokens=24,
                                    temperature=2, seed=7, logprobs=1)  # fmt: skip
    sampled = hot.choices[0].logprobs
    for token, logprob, top in zip(sampled.tokens, sampled.token_logprobs, sampled.top_logprobs):
        assert top[token] == logprob and len(top) <= 2  # the sampled token always, as OpenAI
    assert any(len(top) == 2 for top in sampled.top_logprobs)  # one was not the most likely


def test_logprobs_of_tokens_that_are_parts_of_a_character_carry_their_bytes(client):
    """An emoji is several byte tokens: each is spelled ``bytes:\\x..`` and carries its own
    bytes, which join to the text (OpenAI's ``bytes`` field is there for this)."""
    forced = {"response_format": {"type": "regex", "regex": "👏👏"}}
    answer = ask(client, max_tokens=12, logprobs=True, top_logprobs=2, extra_body=forced)
    content = answer.choices[0].logprobs.content
    assert answer.choices[0].message.content == "👏👏"
    assert b"".join(bytes(e.bytes) for e in content).decode() == "👏👏"
    assert all(e.token.startswith("bytes:") for e in content)
    done = client.completions.create(model="base", prompt="Clap:", max_tokens=12, logprobs=1,
                                     extra_body=forced)  # fmt: skip
    logprobs = done.choices[0].logprobs
    assert done.choices[0].text == "👏👏"
    offsets = logprobs.text_offset  # in characters: the second emoji's bytes all start at 1
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] == 1
    streamed = client.completions.create(model="base", prompt="Clap:", max_tokens=12, logprobs=1,
                                         stream=True, extra_body=forced)  # fmt: skip
    pieces = [c.choices[0] for c in streamed if c.choices and c.choices[0].logprobs]
    assert [o for p in pieces for o in p.logprobs.text_offset] == offsets  # across chunks too
    assert [t for p in pieces for t in p.logprobs.tokens] == logprobs.tokens


def test_a_temperature_near_zero_samples_the_greedy_answer(client):
    """Temperatures this small (in OpenAI's range) divide the logits past a float's range: the
    answer is the greedy one, their limit, not a 500."""
    greedy = ask(client, max_tokens=12, temperature=0).choices[0].message.content
    for temperature in (1e-300, 5e-324):
        answer = ask(client, max_tokens=12, temperature=temperature, seed=3)
        assert answer.choices[0].message.content == greedy


def test_a_grammar_over_llguidances_limits_is_a_400_not_an_empty_answer(client):
    """This regex compiles and passes the check before generation, then its first mask exceeds
    llguidance's lexer limit ("too many expressions constructed"), which leaves only the end
    token allowed: the answer was "" with finish_reason "stop", a string the regex refuses."""
    with pytest.raises(openai.BadRequestError, match="response_format") as failed:
        ask(client, max_tokens=4, response_format={"type": "regex", "regex": "(a{1000}){1000}"})
    assert failed.value.param == "response_format"
    assert ask(client, max_tokens=4, temperature=0).choices[0].message.content


def test_n_choices_with_a_seed_are_reproducible_and_distinct(client):
    first = ask(client, n=3, max_tokens=10, temperature=1.0, seed=11)
    again = ask(client, n=3, max_tokens=10, temperature=1.0, seed=11)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1
    one = ask(client, max_tokens=10, temperature=1.0, seed=11)
    assert first.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    streamed = list(ask(client, n=2, max_tokens=6, temperature=0, stream=True,
                        stream_options={"include_usage": True}))  # fmt: skip
    assert {c.choices[0].index for c in streamed if c.choices} == {0, 1}
    assert streamed[-1].usage.prompt_tokens == one.usage.prompt_tokens


def test_penalties_and_logit_bias_change_the_answer(client, base_dir):
    from transformers import AutoTokenizer

    plain = ask(client, content="Repeat: la la la la la la", max_tokens=16, temperature=0)
    penalised = ask(client, content="Repeat: la la la la la la", max_tokens=16, temperature=0,
                    frequency_penalty=2.0, presence_penalty=2.0)  # fmt: skip
    assert plain.choices[0].message.content != penalised.choices[0].message.content
    greedy = ask(client, max_tokens=4, temperature=0).choices[0].message.content
    first = AutoTokenizer.from_pretrained(base_dir).encode(greedy)[0]
    biased = ask(client, max_tokens=4, temperature=0, logit_bias={str(first): -100})
    assert biased.choices[0].message.content != greedy


def test_vllms_sampling_extensions_through_extra_body(client):
    """``min_tokens``, ``repetition_penalty`` and ``min_p`` as vLLM's and SGLang's clients send
    them (the SDK's ``extra_body``), on chat and completions."""
    short = ask(client, content="Say OK.", max_tokens=48, temperature=0)
    assert short.choices[0].finish_reason == "stop"
    floor = short.usage.completion_tokens + 6
    longer = ask(client, content="Say OK.", max_tokens=48, temperature=0,
                 extra_body={"min_tokens": floor})  # fmt: skip
    assert longer.usage.completion_tokens >= floor
    la = "Repeat: la la la la la la"
    plain = ask(client, content=la, max_tokens=16, temperature=0).choices[0].message.content
    penalised = ask(client, content=la, max_tokens=16, temperature=0,
                    extra_body={"repetition_penalty": 2.0}).choices[0].message.content  # fmt: skip
    assert penalised != plain
    # min_p = 1 keeps only the likeliest token: sampling at temperature 1 gives greedy's answer
    greedy = client.completions.create(model="base", prompt="The sea is", max_tokens=12,
                                       temperature=0).choices[0].text  # fmt: skip
    for seed in (1, 2):
        only_top = client.completions.create(model="base", prompt="The sea is", max_tokens=12,
                                             temperature=1.0, seed=seed,
                                             extra_body={"min_p": 1.0}).choices[0].text  # fmt: skip
        assert only_top == greedy


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
     ({"repetition_penalty": 2.5}, "repetition_penalty"), ({"min_tokens": -1}, "min_tokens"),
     ({"min_tokens": 9, "max_tokens": 8}, "min_tokens")],
)  # fmt: skip
def test_sampling_extensions_out_of_range_are_a_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, extra_body=extra)
    assert refused.value.param == param


def test_openai_inputs_content_parts_developer_role_and_token_prompts(client):
    parts = [{"type": "text", "text": "Name a fruit."}]
    with_parts = client.chat.completions.create(
        model="base", max_tokens=8, temperature=0,
        messages=[{"role": "developer", "content": "Answer in one word."},
                  {"role": "user", "content": parts}],
    )  # fmt: skip
    as_system = client.chat.completions.create(
        model="base", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "Name a fruit."}],
    )  # fmt: skip
    assert with_parts.choices[0].message.content == as_system.choices[0].message.content
    by_ids = client.completions.create(model="base", prompt=[504, 3384, 314], max_tokens=4,
                                       temperature=0)  # fmt: skip
    assert by_ids.usage.prompt_tokens == 3 and by_ids.choices[0].text
    batch = client.completions.create(model="base", prompt=["One", "Two"], max_tokens=2)
    assert [c.index for c in batch.choices] == [0, 1]
    echoed = client.completions.create(model="base", prompt="The sky is", max_tokens=3,
                                       temperature=0, echo=True)  # fmt: skip
    assert echoed.choices[0].text.startswith("The sky is")


def test_an_answer_appended_to_the_next_turns_messages(client):
    """The SDK's usual multi-turn idiom: the answer's message object (or its ``model_dump()``,
    with its null ``refusal``, ``tool_calls``, ...) goes into the next request."""
    turns = [{"role": "user", "content": "Hi, my name is Bob."}]
    first = client.chat.completions.create(model="base", messages=turns, max_tokens=6)
    for sent_back in (first.choices[0].message, first.choices[0].message.model_dump()):
        messages = [*turns, sent_back, {"role": "user", "content": "What is my name?"}]
        second = client.chat.completions.create(model="alpha", messages=messages, max_tokens=6)
        assert second.choices[0].finish_reason in {"stop", "length"}


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "SmolLM2-135M-Instruct" and {"alpha", "beta"} <= set(ids)
    assert client.models.retrieve("alpha").id == "alpha"
    for base in ("base", "SmolLM2-135M-Instruct"):
        assert client.models.retrieve(base).id == "SmolLM2-135M-Instruct"
    assert client.models.retrieve("base:alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_an_answer_with_many_logprobs_is_built_off_the_loop_and_reads_the_same(client, monkeypatch):
    """Over ``INLINE_LOGPROBS`` entries the answer is built and written in a thread."""
    from engine.api import routes

    fields = {"max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3, "n": 2}
    inline = ask(client, **fields)
    monkeypatch.setattr(routes, "INLINE_LOGPROBS", 0)
    threaded = ask(client, **fields)
    strip = {"id", "created"}
    assert threaded.model_dump(exclude=strip) == inline.model_dump(exclude=strip)
    assert all(c.logprobs.content for c in threaded.choices)
