"""The CPU default backend on the real SmolLM2 with real peft adapters (no mocks)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import pytest

from engine import (
    AdapterConflictError,
    AdapterLoadError,
    AdapterNotFoundError,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
)

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def chat(adapter=None, content=None, max_tokens=16, **params) -> GenerationRequest:
    """A chat request, greedy unless a temperature is given."""
    messages = [{"role": "user", "content": content}] if content else QUESTION
    params = {"temperature": 0.0} | params
    return GenerationRequest(
        adapter=adapter, messages=messages, params=SamplingParams(max_tokens=max_tokens, **params)
    )


async def collect(engine, request):
    return [chunk async for chunk in engine.stream(request)]


def test_stream_deltas_join_to_the_full_text(hf_engine):
    chunks = asyncio.run(collect(hf_engine, chat("alpha", max_tokens=24)))
    whole = asyncio.run(hf_engine.complete(chat("alpha", max_tokens=24)))
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    last = chunks[-1]
    assert last.finish_reason in {"stop", "length"}
    assert last.usage.completion_tokens == len(whole.token_ids)
    assert last.timings.ttft_s > 0 and last.timings.e2e_s >= last.timings.ttft_s
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_adapter_output_differs_from_base(hf_engine):
    base = asyncio.run(hf_engine.complete(chat(None)))
    alpha = asyncio.run(hf_engine.complete(chat("alpha")))
    beta = asyncio.run(hf_engine.complete(chat("beta")))
    assert base.token_ids != alpha.token_ids
    assert alpha.token_ids != beta.token_ids


def test_mixed_batch_rows_match_running_alone(hf_engine):
    requests = [
        chat("alpha", "Write a haiku about the sea.", max_tokens=20),
        chat("beta", "What is 2 + 2?", max_tokens=20),
        chat(None, "Give one tip for a job interview, in detail please.", max_tokens=20),
    ]
    alone = [asyncio.run(hf_engine.complete(r)).token_ids for r in requests]
    hf_engine.peak_running = 0
    together = asyncio.run(hf_engine.generate(requests))
    assert hf_engine.peak_running == 3, "the three requests did not share a batch"
    assert [c.token_ids for c in together] == alone


def test_request_joining_a_running_batch_matches_alone(hf_engine):
    first = chat("alpha", "Tell me a long story about a fox.", max_tokens=40, ignore_eos=True)
    second = chat("beta", "Hello!", max_tokens=12)
    alone = [asyncio.run(hf_engine.complete(r)).token_ids for r in (first, second)]

    async def staggered():
        running = asyncio.create_task(hf_engine.complete(first))
        while hf_engine.stats()["running"] == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the first row is mid-decode when the second arrives
        return await asyncio.gather(running, hf_engine.complete(second))

    results = asyncio.run(staggered())
    assert [r.token_ids for r in results] == alone


LONG = "Count the words: " + "word " * 400


def test_a_long_prompt_prefilled_a_chunk_a_step_matches_it_prefilled_whole(hf_engine, monkeypatch):
    request = chat("alpha", LONG, max_tokens=12)
    whole = asyncio.run(hf_engine.complete(request)).token_ids
    monkeypatch.setattr(hf_engine.settings, "prefill_tokens", 32)
    assert asyncio.run(hf_engine.complete(request)).token_ids == whole


def test_running_streams_keep_decoding_while_a_long_prompt_prefills(hf_engine, monkeypatch):
    """A 400-token prompt at 16 tokens a step takes 25 steps to its first token; the stream
    already running gets a token every one of them (prefilled whole: one step, 1-2 tokens), and
    a short prompt that came after it is answered meanwhile."""
    monkeypatch.setattr(hf_engine.settings, "prefill_tokens", 16)
    long = chat("beta", LONG, max_tokens=4)

    async def tokens_while_the_long_prompt_waits() -> tuple[int, bool]:
        running = hf_engine.stream(chat("alpha", "Hello!", max_tokens=300, ignore_eos=True))
        waiting = hf_engine.stream(long)
        await anext(running)
        first = asyncio.ensure_future(anext(waiting))
        while long.request_id not in hf_engine.rows:  # tokenized and waiting for the worker
            await anext(running)
        hi = GenerationRequest(prompt="Hi", params=SamplingParams(max_tokens=1))  # 1 token
        short = asyncio.ensure_future(hf_engine.complete(hi))
        tokens = 0
        while not first.done():
            await anext(running)
            tokens += 1
        short_answered_first = short.done()
        await first
        await short
        await running.aclose()
        await waiting.aclose()
        while hf_engine.stats()["running"]:
            await asyncio.sleep(0.01)
        return tokens, short_answered_first

    tokens, short_answered_first = asyncio.run(tokens_while_the_long_prompt_waits())
    assert tokens >= 10
    assert short_answered_first, "a short prompt waited for the long one's chunks"


def test_logprobs_cover_the_texts_tokens_not_the_end_of_turn(hf_engine):
    """As OpenAI's: one entry per token of the answer's text; the end-of-turn token that ended
    it is in ``completion_tokens`` but has no entry."""
    chunks = asyncio.run(
        collect(
            hf_engine, chat(None, "Is the sky blue? Answer yes or no.", max_tokens=64, logprobs=0)
        )
    )
    assert chunks[-1].finish_reason == "stop"
    entries = [e for c in chunks for e in c.logprobs or []]
    assert entries and not {e.token_id for e in entries} & hf_engine.eos_ids
    assert len(entries) == chunks[-1].usage.completion_tokens - 1
    assert "".join(e.text for e in entries) == "".join(c.text for c in chunks)


def test_unknown_adapter_is_an_error_not_the_base_model(hf_engine):
    with pytest.raises(AdapterNotFoundError, match="nope"):
        asyncio.run(collect(hf_engine, chat("nope")))


def test_cancelling_a_stream_stops_generation(hf_engine):
    async def read_three_then_leave():
        stream = hf_engine.stream(chat("alpha", max_tokens=400, ignore_eos=True))
        for _ in range(3):
            await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            if hf_engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)

    before = hf_engine.stats()["generated_tokens"]
    asyncio.run(read_three_then_leave())
    assert hf_engine.stats()["running"] == 0
    settled = hf_engine.stats()["generated_tokens"]
    time.sleep(0.3)
    assert hf_engine.stats()["generated_tokens"] == settled
    assert settled - before < 100, "generation went on after the client left"


def test_load_use_and_unload_at_run_time(hf_engine, adapter_dirs, tmp_path):
    copy = shutil.copytree(adapter_dirs["beta"], tmp_path / "gamma")
    expected = asyncio.run(hf_engine.complete(chat("beta"))).token_ids
    asyncio.run(hf_engine.load_adapter("gamma", str(copy)))
    assert "gamma" in hf_engine.adapters()
    assert asyncio.run(hf_engine.complete(chat("gamma"))).token_ids == expected
    asyncio.run(hf_engine.unload_adapter("gamma"))
    assert "gamma" not in hf_engine.adapters()
    with pytest.raises(AdapterNotFoundError):
        asyncio.run(hf_engine.complete(chat("gamma")))
    assert asyncio.run(hf_engine.complete(chat("beta"))).token_ids == expected


def two_loads_at_once(engine, path: str) -> list:
    async def both():
        loads = [engine.load_adapter("twin", path) for _ in range(2)]
        return await asyncio.gather(*loads, return_exceptions=True)

    try:
        return asyncio.run(both())
    finally:
        if "twin" in engine.adapters():
            asyncio.run(engine.unload_adapter("twin"))


def test_two_loads_of_one_name_at_once_load_it_once_and_refuse_the_other(hf_engine, adapter_dirs):
    outcomes = two_loads_at_once(hf_engine, adapter_dirs["beta"])
    assert outcomes[0] is None and isinstance(outcomes[1], AdapterConflictError), outcomes
    assert "being loaded" in str(outcomes[1]) and "twin" not in hf_engine.adapters()


def test_two_loads_of_one_name_at_once_on_peft_refuse_the_second(base_dir, adapter_dirs):
    """peft loads a second adapter of one name over the first without a word (a review found
    both answered 200 in this mode)."""
    from engine.backends.hf import HFEngine
    from engine.registry import HFSettings

    engine = HFEngine(base_dir, "SmolLM2-135M-Instruct", settings=HFSettings(lora="peft"))
    try:
        outcomes = two_loads_at_once(engine, adapter_dirs["beta"])
        assert outcomes[0] is None and isinstance(outcomes[1], AdapterConflictError), outcomes
    finally:
        asyncio.run(engine.shutdown())


def test_bad_adapter_loads_are_refused_and_serving_goes_on(hf_engine, tmp_path):
    with pytest.raises(AdapterLoadError, match="no such directory"):
        asyncio.run(hf_engine.load_adapter("ghost", str(tmp_path / "missing")))
    with pytest.raises(AdapterConflictError, match="already loaded") as taken:
        asyncio.run(hf_engine.load_adapter("alpha", str(tmp_path)))
    assert (taken.value.status_code, taken.value.param) == (409, "name")
    with pytest.raises(AdapterLoadError, match="slug"):
        asyncio.run(hf_engine.load_adapter("Bad Name", str(tmp_path)))
    assert asyncio.run(hf_engine.complete(chat("alpha", max_tokens=2))).usage.completion_tokens


def test_finish_reasons_stop_strings_and_limits(hf_engine):
    capped = asyncio.run(hf_engine.complete(chat(None, max_tokens=3, ignore_eos=True)))
    assert capped.finish_reason == "length" and capped.usage.completion_tokens == 3
    free = asyncio.run(hf_engine.complete(chat(None, max_tokens=60)))
    word = free.text.split()[2]
    stopped = asyncio.run(hf_engine.complete(chat(None, max_tokens=60, stop=[word])))
    assert stopped.finish_reason == "stop"
    assert word not in stopped.text and free.text.startswith(stopped.text)


def test_bad_requests_raise_clear_errors(hf_engine):
    with pytest.raises(InvalidRequestError, match="temperature"):
        asyncio.run(hf_engine.complete(chat(None, temperature=-1)))
    with pytest.raises(PromptTooLongError, match="context"):
        asyncio.run(hf_engine.complete(chat(None, max_tokens=10**6)))
    with pytest.raises(InvalidRequestError, match="prompt"):
        asyncio.run(hf_engine.complete(GenerationRequest(adapter=None)))


def test_seeded_sampling_is_reproducible(hf_engine):
    request = chat("alpha", max_tokens=12, temperature=0.9, seed=7)
    first = asyncio.run(hf_engine.complete(request)).token_ids
    again = asyncio.run(hf_engine.complete(chat("alpha", max_tokens=12, temperature=0.9, seed=7)))
    assert again.token_ids == first


def test_health_answers_a_one_token_generation(hf_engine):
    health = asyncio.run(hf_engine.health())
    assert health["ok"] and health["backend"] == "hf"
    assert set(health["adapters"]) >= {"alpha", "beta"}


def until_idle(engine, within_s: float = 600) -> None:
    """Wait until the worker holds no request (one an earlier test cut may still be ending): a
    busy engine reports healthy without a probe."""
    deadline = time.monotonic() + within_s
    while (stats := engine.stats())["running"] or stats["queued"]:
        assert time.monotonic() < deadline, f"still busy after {within_s} s: {stats}"
        time.sleep(0.05)


def test_health_calls_that_come_together_share_one_probe(hf_engine, monkeypatch):
    """Ten at once: one generation; the next call, a fresh one."""
    until_idle(hf_engine)
    probes, real = [], hf_engine.complete

    async def counted(request):
        probes.append(request)
        return await real(request)

    monkeypatch.setattr(hf_engine, "complete", counted)

    async def ten_then_one():
        reports = await asyncio.gather(*(hf_engine.health() for _ in range(10)))
        return reports, await hf_engine.health()

    reports, later = asyncio.run(ten_then_one())
    assert all(r["ok"] for r in reports) and later["ok"]
    assert len(probes) == 2


def test_end_of_turn_ids_include_the_chatml_markers(base_dir):
    from transformers import AutoTokenizer

    from engine.text import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = end_of_turn_ids(tokenizer)
    assert set(tokenizer.convert_ids_to_tokens(sorted(ids))) == {"<|im_start|>", "<|im_end|>"}


def test_shipped_sql_adapter_stops_at_the_end_of_its_answer():
    """The shipped adapters end their answers with <|im_start|> (a new turn): the engine must
    stop there, not run on into an invented next message (which breaks the SQL)."""
    from engine import build_engine
    from engine.registry import load_registry
    from finetune.data import load_split
    from finetune.tasks import TASKS

    registry = load_registry(ROOT / "adapters.yaml")
    registry.adapters = [a for a in registry.adapters if a.name == "sql"]
    engine = build_engine(registry, backend="hf")
    try:
        example = load_split("sql", "test")[0]
        request = GenerationRequest(
            adapter="sql",
            messages=[{"role": "user", "content": TASKS["sql"].prompt(example["input"])}],
            params=SamplingParams(max_tokens=128, temperature=0.0),
        )
        done = asyncio.run(engine.complete(request))
    finally:
        asyncio.run(engine.shutdown())
    assert done.finish_reason == "stop" and done.usage.completion_tokens < 100
    assert done.text.strip().upper().startswith("SELECT") and "user" not in done.text


def test_the_fast_default_gives_the_exact_modes_greedy_tokens_on_task_prompts():
    """The CPU default's fast mode (batched LoRA over fp16 base weights) against its exact mode
    (fp32), the shipped adapters and the base on two test prompts of every task, one mixed
    batch each: SmolLM2's weights are bf16 values, which fp16 holds exactly."""
    from engine import build_engine
    from engine.registry import load_registry
    from finetune.data import load_split
    from finetune.tasks import TASKS

    requests = [
        GenerationRequest(
            adapter=adapter,
            messages=[{"role": "user", "content": TASKS[task].prompt(example["input"])}],
            params=SamplingParams(max_tokens=24, temperature=0.0),
        )
        for task in TASKS
        for example in load_split(task, "test")[:2]
        for adapter in (task, None)
    ]
    tokens = {}
    for weights in ("fp16", "fp32"):
        registry = load_registry(ROOT / "adapters.yaml")
        registry.engine.hf.base_weights = weights
        engine = build_engine(registry, backend="hf")
        try:
            done = asyncio.run(engine.generate(requests))
        finally:
            asyncio.run(engine.shutdown())
        tokens[weights] = [c.token_ids for c in done]
    same = sum(a == b for a, b in zip(tokens["fp16"], tokens["fp32"]))
    assert same >= 0.9 * len(requests), f"{same}/{len(requests)} sequences identical"


def test_repetition_penalty_and_min_tokens_adjust_the_logits_as_sglang_does():
    """Generated tokens: a positive logit divided by the penalty, a negative one multiplied
    (after presence and frequency penalties); the end tokens barred until ``min_tokens``."""
    import torch

    from engine.backends.sample import adjusted
    from engine.interface import SamplingParams

    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, min_tokens=4)
    out = adjusted(logits, params, [0, 1, 1], None, end_ids={4})
    assert out.tolist() == [0.75, -5.0, 1.0, 0.5, float("-inf")]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5, 3.0]  # the model's own, for logprobs
    assert adjusted(logits, params, [0, 1, 2, 3], None, end_ids={4})[4] == 3.0
    unchanged = SamplingParams(ignore_eos=True, min_tokens=3)
    assert adjusted(logits, unchanged, [], None, end_ids={4})[4] == 3.0


def test_copies_of_one_prompt_starting_together_are_tokenized_once(hf_engine, monkeypatch):
    """``n`` copies share their prompt's objects; a list changed in place afterwards is
    tokenized afresh (the memory lasts one turn of the event loop)."""
    from engine.backends import common

    calls = []

    def counted(tokenizer, request, chat_template):
        calls.append(request)
        return real(tokenizer, request, chat_template)

    real = common.prompt_token_ids
    monkeypatch.setattr(common, "prompt_token_ids", counted)
    messages = [{"role": "user", "content": "Hi"}]
    copies = [
        GenerationRequest(messages=messages, params=SamplingParams(max_tokens=1, seed=i))
        for i in range(4)
    ]
    done = asyncio.run(hf_engine.generate(copies))
    assert len(calls) == 1 and len({d.usage.prompt_tokens for d in done}) == 1
    messages[0]["content"] = "A much longer question, about the colour of the sea at night?"
    longer = GenerationRequest(messages=messages, params=SamplingParams(max_tokens=1))
    again = asyncio.run(hf_engine.complete(longer))
    assert len(calls) == 2 and again.usage.prompt_tokens > done[0].usage.prompt_tokens


def forwards_counted(engine, monkeypatch) -> list[tuple[int, int]]:
    """(rows, tokens) of every forward the worker runs from now on."""
    shapes, real = [], engine.forward

    def counted(rows, input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return real(rows, input_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "forward", counted)
    return shapes


async def queued_together(engine, requests) -> list:
    """Complete the requests with the worker held until every one waits in its queue (the
    worker's lock is re-entrant for this thread, which the engine's own calls run on)."""
    with engine.wake:
        tasks = [asyncio.ensure_future(engine.complete(r)) for r in requests]
        while len(engine.pending) < len(requests):
            await asyncio.sleep(0.01)
    return await asyncio.gather(*tasks)


def test_requests_with_one_prompt_share_its_prefill(hf_engine, monkeypatch):
    """Seeded copies of one prompt (a request's ``n``) are prefilled once, as one row, and
    each decodes apart: every copy answers as its seed does alone, and a different prompt in
    the same step keeps its own answer."""
    sampled = {"temperature": 0.9, "max_tokens": 10, "ignore_eos": True}
    copies = [chat("alpha", "Write a haiku about the sea.", seed=s, **sampled) for s in (1, 2, 3)]
    requests = [*copies, chat("beta", "What is 2 + 2?", max_tokens=10)]
    alone = [asyncio.run(hf_engine.complete(r)).token_ids for r in requests]
    assert len({tuple(a) for a in alone[:3]}) == 3, "the seeds gave the same answer"
    shapes = forwards_counted(hf_engine, monkeypatch)
    together = asyncio.run(queued_together(hf_engine, requests))
    assert [c.token_ids for c in together] == alone
    prefill_rows, prefill_width = shapes[0]
    assert prefill_rows == 2 and prefill_width > 1  # two distinct prompts, not four rows
    assert shapes[1] == (4, 1) and all(width == 1 for _, width in shapes[1:])  # then decodes


def test_copies_of_a_long_prompt_share_its_chunks(hf_engine, monkeypatch):
    """A prompt chunked over many steps is prefilled once for all its copies, those queued
    with it and those that come while it is chunked, and each answers as it does alone."""
    monkeypatch.setattr(hf_engine.settings, "prefill_tokens", 64)
    requests = [chat("alpha", LONG, max_tokens=6, temperature=0.9, seed=s) for s in (1, 2)]
    shapes = forwards_counted(hf_engine, monkeypatch)
    alone = [asyncio.run(hf_engine.complete(r)).token_ids for r in requests]
    chunks = len([width for _, width in shapes if width > 1]) // 2  # each prompt's, alone
    assert chunks >= 6
    shapes.clear()
    together = asyncio.run(queued_together(hf_engine, requests))
    assert [c.token_ids for c in together] == alone
    prefills = [rows for rows, width in shapes if width > 1]
    assert prefills == [1] * chunks  # one row a chunk, the prompt's chunks once

    reached, go_on, counted = threading.Event(), threading.Event(), hf_engine.forward

    def paused_before_the_second_chunk(*args, **kwargs):
        if len(shapes) == 1:
            reached.set()
            go_on.wait(60)
        return counted(*args, **kwargs)

    async def a_copy_arrives_mid_prefill():
        first = asyncio.ensure_future(hf_engine.complete(requests[0]))
        assert await asyncio.to_thread(reached.wait, 60)
        second = asyncio.ensure_future(hf_engine.complete(requests[1]))
        while not any(row.request is requests[1] for row in hf_engine.pending):
            await asyncio.sleep(0.01)
        go_on.set()
        return await asyncio.gather(first, second)

    monkeypatch.setattr(hf_engine, "forward", paused_before_the_second_chunk)
    shapes.clear()
    late = asyncio.run(a_copy_arrives_mid_prefill())
    assert [c.token_ids for c in late] == alone
    assert [rows for rows, width in shapes if width > 1] == [1] * chunks  # the late one joined


def test_a_long_prompts_later_chunks_are_smaller_as_its_context_grows(hf_engine):
    """Each chunk's step costs about what the first did: attention over the context so far
    grows, so the chunk shrinks (SmolLM2-135M: at 3,073 tokens of context, half of it)."""
    from engine.backends.hf import chunk_tokens

    balance = hf_engine.attention_balance
    assert balance == 3073  # its layer's 3.5 M weights against 2 × 576 hidden units
    sizes = [chunk_tokens(512, context, balance) for context in (0, 3073, 7000)]
    assert sizes == [512, 256, 156]
    assert chunk_tokens(512, 10**6, balance) == 16 and chunk_tokens(512, 9000, None) == 512


def test_prefill_keys_match_on_adapter_and_every_prompt_id():
    from engine.backends.hf import PrefillKey

    ids = list(range(8000))
    key = PrefillKey("alpha", ids)
    assert key == PrefillKey("alpha", list(ids)) and len({key, PrefillKey("alpha", ids)}) == 1
    assert key != PrefillKey("beta", ids) and key != PrefillKey(None, ids)
    assert key != PrefillKey("alpha", [*ids[:-1], 8000])


def test_one_client_request_holds_at_most_three_quarters_of_the_batch(base_dir):
    """``n`` rows of one request (its ``group``) took every row of the batch: a one-token
    request behind them waited until they had all finished (minutes, on a CPU). Up to the share
    a request's rows run together, alone or not."""
    from engine.backends.hf import HFEngine
    from engine.registry import HFSettings

    engine = HFEngine(base_dir, "SmolLM2-135M-Instruct", settings=HFSettings(max_batch_size=4))

    async def run_group(name: str, rows: int, max_tokens: int, finished: list) -> None:
        requests = [chat(max_tokens=max_tokens, ignore_eos=True) for _ in range(rows)]
        for request in requests:
            request.group = name

        async def one(request: GenerationRequest) -> None:
            await collect(engine, request)
            finished.append(name)

        await asyncio.gather(*(one(r) for r in requests))

    async def peak_running(task: asyncio.Task) -> int:
        peak = 0
        while not task.done():
            peak = max(peak, engine.stats()["running"])
            await asyncio.sleep(0.01)
        return peak

    async def main() -> tuple[int, list[str]]:
        trio = asyncio.create_task(run_group("trio", 3, 20, []))
        peak = await peak_running(trio)
        finished: list[str] = []
        big = asyncio.create_task(run_group("big", 4, 40, finished))
        while engine.stats()["running"] + engine.stats()["queued"] < 4:
            await asyncio.sleep(0.01)  # every row of the big request is in before the small one
        await asyncio.gather(big, run_group("small", 1, 2, finished))
        return peak, finished

    try:
        peak, finished = asyncio.run(main())
    finally:
        asyncio.run(engine.shutdown())
    assert peak == 3  # three rows, three quarters of four: all at once
    # three of the big rows ran at a time, so the small one got a row before they all ended
    assert finished.index("small") < 4, finished
