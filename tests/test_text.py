"""Token ids → text deltas: stop strings cut the text, partial stop strings are held back."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from engine.interface import (
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    validate_messages,
)
from engine.text import TextStream, prompt_token_ids, template_messages


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    return AutoTokenizer.from_pretrained(base_dir)


def stream_text(tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas = []
    for token in tokenizer.encode(text):
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.flush())
    return deltas, stream


def test_deltas_join_to_the_decoded_text(tokenizer):
    text = "Paris is the capital of France. Café crème, naïve résumé — 東京."
    deltas, _ = stream_text(tokenizer, text, [])
    assert "".join(deltas) == text


def test_stop_string_cuts_before_it_even_across_tokens(tokenizer):
    deltas, stream = stream_text(tokenizer, "Answer: positive\n### Next question", ["###"])
    assert stream.stopped
    assert "".join(deltas) == "Answer: positive\n"


def test_partial_stop_is_held_back_then_released(tokenizer):
    deltas, stream = stream_text(tokenizer, "a END? no, ENDLESS", ["END."])
    assert not stream.stopped
    assert "".join(deltas) == "a END? no, ENDLESS"


class CountingLength:
    """A real tokenizer that counts ``len`` (tokenizers 0.22, SGLang's runtime, builds the whole
    vocabulary for each one)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, 0

    def __len__(self):
        self.lengths += 1
        return len(self.tokenizer)

    def encode(self, text):
        return self.tokenizer.encode(text)


def test_the_vocabulary_size_is_read_once_per_tokenizer(tokenizer):
    counting = CountingLength(tokenizer)
    text = GenerationRequest(prompt="Hello there", params=SamplingParams(logit_bias={5: 1.0}))
    ids = GenerationRequest(prompt_ids=[1, 2, 3])
    for request in (text, ids) * 50:
        prompt_token_ids(counting, request, chat_template=False)
    assert counting.lengths == 1
    plain = CountingLength(tokenizer)
    assert prompt_token_ids(plain, GenerationRequest(prompt="Hi"), False) == tokenizer.encode("Hi")
    assert plain.lengths == 0  # nothing to check against the vocabulary


def test_token_ids_outside_the_vocabulary_are_refused(tokenizer):
    vocab = len(tokenizer)
    bias = GenerationRequest(prompt="Hi", params=SamplingParams(logit_bias={vocab: 1.0}))
    with pytest.raises(InvalidRequestError, match="logit_bias token"):
        prompt_token_ids(tokenizer, bias, chat_template=False)
    with pytest.raises(InvalidRequestError, match="prompt token -1"):
        prompt_token_ids(tokenizer, GenerationRequest(prompt_ids=[0, -1]), chat_template=False)


def test_the_held_back_tail_is_the_longest_that_begins_a_stop_string(tokenizer):
    stream = TextStream(tokenizer, ["abcab", "aaaa"])
    assert stream.held_back("xxab") == 2
    assert stream.held_back("zabca") == 4
    assert stream.held_back("baa") == 2
    assert stream.held_back("aaaaaaa") == 3  # a stop string whole is a cut, not held back
    assert stream.held_back("abz") == 0
    assert stream.held_back("") == 0


@pytest.mark.parametrize("text", ["👏👏", "héllo wörld", " 中文", "plain"])
def test_a_token_that_is_part_of_a_character_is_spelled_by_its_bytes(tokenizer, text):
    """As OpenAI spells such a token (``bytes:\\xf0\\x9f``): its bytes come back whole, where
    the plain decode is a replacement character."""
    from engine.text import token_bytes, token_text

    spelled = [token_text(tokenizer, t) for t in tokenizer.encode(text)]
    assert b"".join(token_bytes(s) for s in spelled).decode("utf-8") == text
    assert all("\ufffd" not in s for s in spelled)
    assert any(s.startswith("bytes:") for s in spelled) == (text == "👏👏")


CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip


def test_an_assistants_calls_are_written_after_its_text_for_the_template(tokenizer):
    """Engine messages keep OpenAI's calls (a remote server checks the tool results' ids); the
    prompt shows them as the model writes them under ``tool_choice: required``."""
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
    ]
    shown = template_messages(messages)
    assert shown[1] == {
        "role": "assistant",
        "content": '[{"name": "get_weather", "parameters": {"city": "Paris"}}]',
    }
    assert shown[0] is messages[0] and shown[2] is messages[2]
    assert messages[1]["content"] == "" and messages[1]["tool_calls"] == [CALL]  # not changed
    request = GenerationRequest(messages=messages)
    text = tokenizer.decode(prompt_token_ids(tokenizer, request, chat_template=True))
    assert '"parameters": {"city": "Paris"}' in text and "18 C" in text


def test_tool_results_reach_the_prompt_in_the_order_of_their_calls(tokenizer):
    """OpenAI matches results to calls by id, in any order; the template shows no ids, so the
    prompt lists each run of results in its calls' order."""
    cities = ("Paris", "Oslo", "Rome")
    calls = [CALL | {"id": f"call_{city}", "function": {"name": "get_weather",
             "arguments": json.dumps({"city": city})}} for city in cities]  # fmt: skip
    messages = [
        {"role": "user", "content": "Weather in three cities?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "Rome: 25 C", "tool_call_id": "call_Rome"},
        {"role": "tool", "content": "Paris: 18 C", "tool_call_id": "call_Paris"},
        {"role": "tool", "content": "Oslo: 4 C", "tool_call_id": "call_Oslo"},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "tool", "content": "a result of no call before it", "tool_call_id": "x"},
    ]
    shown = template_messages(messages)
    assert [m["content"] for m in shown[2:5]] == ["Paris: 18 C", "Oslo: 4 C", "Rome: 25 C"]
    assert shown[5] is messages[5] and shown[6] is messages[6] and len(shown) == 7
    assert messages[2]["content"] == "Rome: 25 C"  # the request itself is not changed
    text = tokenizer.decode(
        prompt_token_ids(tokenizer, GenerationRequest(messages=messages[:5]), chat_template=True)
    )
    assert text.index("Paris: 18 C") < text.index("Oslo: 4 C") < text.index("Rome: 25 C")


def test_calls_keep_arguments_that_are_not_json_as_their_text_beside_the_answers_text():
    call = CALL | {"function": {"name": "f", "arguments": "not json"}}
    [shown] = template_messages([{"role": "assistant", "content": "Sure.", "tool_calls": [call]}])
    assert shown["content"] == 'Sure.\n[{"name": "f", "parameters": "not json"}]'


@pytest.mark.parametrize(
    "calls",
    [{"function": {}}, [{"function": {"name": "f"}}], ["f"],
     [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]],  # no id
)  # fmt: skip
def test_engine_messages_with_calls_not_in_openais_shape_are_refused(calls):
    with pytest.raises(InvalidRequestError, match="tool_calls"):
        validate_messages([{"role": "assistant", "content": "", "tool_calls": calls}])
    validate_messages([{"role": "assistant", "content": "", "tool_calls": None}])  # a dump's


@pytest.mark.parametrize(
    "arguments",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"x": "\\ud800"}',
    ],  # past the parser's depth; a lone surrogate
)
def test_arguments_a_prompt_cannot_hold_as_json_go_as_their_text(tokenizer, arguments):
    call = CALL | {"function": {"name": "f", "arguments": arguments}}
    [shown] = template_messages([{"role": "assistant", "content": "", "tool_calls": [call]}])
    assert json.loads(shown["content"]) == [{"name": "f", "parameters": arguments}]
    shown["content"].encode("utf-8")  # the tokenizer can take it


def test_a_participants_name_reaches_a_chat_template_that_shows_names(base_dir):
    from engine.api.protocol import ChatMessage

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m.get('name', m['role']) }}: {{ m['content'] }}\n{% endfor %}"
    )
    message = ChatMessage(role="user", name="bob", content="hi").as_engine_message()
    assert message == {"role": "user", "content": "hi", "name": "bob"}
    request = GenerationRequest(messages=[message])
    assert tokenizer.decode(prompt_token_ids(tokenizer, request, True)) == "bob: hi\n"
