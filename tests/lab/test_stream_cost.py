"""lab/stream_cost.py: the stand-in drives the real SGLang backend's stream path to the end."""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lab"))

import stream_cost


def test_every_stream_delivers_every_output_and_a_cost_is_measured(monkeypatch):
    monkeypatch.setattr(stream_cost, "STREAMS", 8)
    monkeypatch.setattr(stream_cost, "TOKENS", 12)
    samples = asyncio.run(stream_cost.timed_rounds(2))  # asserts 8 × 12 chunks came through
    assert len(samples) == 2 and all(s > 0 for s in samples)


def test_the_table_gives_each_tree_against_the_first_per_round():
    named = [["old", "/tmp/old"], ["new", "."]]
    extras = [
        {"len_tokenizer_ms": 4.0, "loop_1e7_s": 0.5},
        {"len_tokenizer_ms": 6.0, "loop_1e7_s": 0.7},
    ]
    libraries = "tokenizers 0.22.2, transformers 5.12.1"
    table = stream_cost.markdown(
        named, {"old": [10.0, 20.0], "new": [5.0, 30.0]}, 2, libraries, extras
    )
    assert "transformers 5.12.1: `len(tokenizer)` 5.000 ms [4.000–6.000]" in table
    assert "1e7 additions 0.60 s [0.50–0.70]" in table
    assert "| old (`/tmp/old`) | 15.0 [10.0–20.0] | 1.00 [1.00–1.00] |" in table
    assert "| new (`.`) | 17.5 [5.0–30.0] | 1.00 [0.50–1.50] |" in table


def test_a_request_reads_no_vocabulary_wide_tokenizer_call(monkeypatch, base_dir):
    """``len(tokenizer)`` and ``get_vocab`` build the whole vocabulary in tokenizers 0.22 (the GPU
    runtime's): the serving path may read them once, never per request."""
    from transformers import AutoTokenizer

    kind = type(AutoTokenizer.from_pretrained(base_dir))
    calls = {"len": 0, "get_vocab": 0}

    def counted(name, original):
        def call(self, *args, **kwargs):
            calls[name] += 1
            return original(self, *args, **kwargs)

        return call

    monkeypatch.setattr(kind, "__len__", counted("len", kind.__len__))
    monkeypatch.setattr(kind, "get_vocab", counted("get_vocab", kind.get_vocab))
    monkeypatch.setattr(stream_cost, "STREAMS", 32)
    monkeypatch.setattr(stream_cost, "TOKENS", 4)
    asyncio.run(stream_cost.timed_rounds(2))  # 64 requests through admission and the stream
    assert calls["len"] <= 2 and calls["get_vocab"] <= 2  # the engine's start, not a request's
