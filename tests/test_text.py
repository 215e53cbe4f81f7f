"""Token ids → text deltas: stop strings cut the text, partial stop strings are held back."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engine.text import TextStream


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
