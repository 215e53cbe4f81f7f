"""SGLang backend on a GPU vs the CPU backend: same adapters, same prompts, greedy tokens compared.

On the CPU machine (makes two random peft adapters and the CPU backend's greedy reference):
    python lab/gpu_check.py reference .gpu/check
On the GPU machine (with the offline SGLang runtime on PYTHONPATH):
    python lab/gpu_check.py run .gpu/check --out $OUT/gpu_check.json
On the CPU, the same checks over the CPU backend (a dry run of this script, not of SGLang):
    python lab/gpu_check.py dry-run .gpu/check --out /tmp/dry.json --concurrent 24

The run starts ``SGLangEngine`` with both adapters, streams one completion per adapter and the
base, sends a mixed batch (alpha, beta, base, ...) at once, and compares every row's greedy tokens
with the CPU reference. It does so for each dtype given (bfloat16 is the default on GPU; float16
keeps more mantissa bits; SGLang 0.5.17 has no float32 rmsnorm) and runs the HF backend on the
GPU in float32 as a control.

Then the request features through ``SGLangEngine`` (``features``), each with a verdict in ``ok``:
``logprobs`` (one entry per streamed token, each ≤ 0, the greedy token its own top choice; and
against the CPU's log-probabilities), ``choice`` and ``json`` constraints (the answer is one of the
choices / parses as JSON, in a batch with an unconstrained row that must come out as it does
alone; and against the CPU's constrained tokens), ``tokenize`` (a chat with a tool's result:
the CPU's ids, and back), ``tool_calls`` (a named function's and ``required``'s calls parse),
``abort`` (``engine.abort`` ends a running
stream with ``RequestEndedError``, and the engine goes on) and ``concurrent`` (200 streams at
once, past the adaptive ``stream_interval``'s 128-request step: every token arrives) and
``context_fit`` (a prompt that leaves less room than the default ``max_tokens``: an answer of
the room less SGLang's 2 reserved tokens, not a refusal; the longest prompt SGLang takes is
answered, one a token longer a 400, not its abort). The last
line says ``GPU CHECK <dtype>: PASS`` or which checks failed; the exit status is 1 if any did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import GenerationRequest, SamplingParams
from engine.base_model import resolve_base
from engine.constraints import ResponseFormat
from engine.interface import PromptTooLongError
from engine.sampling import resolve
from tests.helpers import WEATHER_TOOL as WEATHER

ADAPTERS = {
    "alpha": {"r": 8, "target_modules": ["q_proj", "v_proj"], "seed": 1},
    "beta": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "seed": 2},
}
PROMPTS = [
    "Name three colours of the rainbow.",
    "Write a haiku about the sea.",
    "What is the capital of Japan? Answer in one sentence.",
    "Give one tip for a job interview.",
]
MAX_TOKENS = 32
CHOICES = ["fresh", "rotten"]
REVIEW = "Is this review fresh or rotten? 'A warm, funny delight from start to finish.'"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}
LANDMARK = "Where is the Eiffel Tower? Answer as JSON with the city and the country."
TOOL_TURNS = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'},
    {"role": "tool", "content": "18 C and sunny"},
]
CONCURRENT, CONCURRENT_TOKENS = 200, 48


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    """Greedy: SamplingParams' own default temperature is OpenAI's 1.0."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def requests() -> list[GenerationRequest]:
    return [
        GenerationRequest(
            adapter=adapter,
            messages=[{"role": "user", "content": prompt}],
            params=greedy(),
        )
        for adapter in [*ADAPTERS, None]
        for prompt in PROMPTS
    ]


def key(request: GenerationRequest) -> str:
    return f"{request.adapter or 'base'}|{request.messages[0]['content']}"


async def run_all(engine, one_by_one: bool) -> tuple[dict[str, list[int]], float]:
    started = time.perf_counter()
    batch = requests()
    if one_by_one:
        done = [await engine.complete(r) for r in batch]
    else:
        done = await engine.generate(batch)
    return {key(r): c.token_ids for r, c in zip(batch, done)}, time.perf_counter() - started


def make_reference(folder: Path) -> None:
    from engine.backends.hf import HFEngine
    from tests.helpers import make_peft_adapter

    base = resolve_base("smollm2")
    dirs = {n: make_peft_adapter(base, folder / "adapters" / n, **s) for n, s in ADAPTERS.items()}
    engine = HFEngine(base, "SmolLM2-135M-Instruct", adapters=dirs, device="cpu")
    tokens, seconds = asyncio.run(run_all(engine, one_by_one=True))
    features = asyncio.run(feature_reference(engine))
    asyncio.run(engine.shutdown())
    reference = {"backend": "hf-cpu-fp32", "tokens": tokens, "features": features}
    (folder / "reference.json").write_text(json.dumps(reference))
    print(f"reference: {len(tokens)} generations in {seconds:.1f}s → {folder / 'reference.json'}")


def constrained_requests() -> dict[str, GenerationRequest]:
    """The choice and JSON-schema requests, base and one adapter each."""
    choice = ResponseFormat(type="choice", choices=CHOICES).constraint()
    schema = ResponseFormat(
        type="json_schema", json_schema={"name": "place", "schema": SCHEMA}
    ).constraint()
    out = {}
    for adapter in ("alpha", None):
        name = adapter or "base"
        out[f"choice|{name}"] = GenerationRequest(
            adapter=adapter,
            messages=[{"role": "user", "content": REVIEW}],
            params=greedy(8, constraint=choice),
        )
        out[f"json|{name}"] = GenerationRequest(
            adapter=adapter,
            messages=[{"role": "user", "content": LANDMARK}],
            params=greedy(96, constraint=schema),
        )
    return out


def logprob_request() -> GenerationRequest:
    return GenerationRequest(
        adapter="alpha",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        params=greedy(logprobs=2),
    )


async def feature_reference(engine) -> dict:
    """The CPU's constrained tokens and log-probabilities, to set the GPU's beside."""
    constrained = {}
    for name, request in constrained_requests().items():
        constrained[name] = (await engine.complete(request)).token_ids
    done = await engine.complete(logprob_request())
    logprobs = [[e.token_id, e.logprob] for e in done.logprobs or []]
    prompt, _ = await engine.tokenize(GenerationRequest(messages=TOOL_TURNS))
    return {"constrained": constrained, "logprobs": logprobs, "tool_turns_prompt": prompt}


def compare(reference: dict[str, list[int]], got: dict[str, list[int]]) -> dict:
    exact, first_diffs, matched, total = 0, {}, 0, 0
    for k, ref in reference.items():
        out = got.get(k, [])
        prefix = next(
            (i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out))
        )
        exact += ref == out
        matched += sum(a == b for a, b in zip(ref, out))
        total += max(len(ref), len(out))
        if ref != out:
            first_diffs[k] = prefix
    return {
        "sequences": len(reference),
        "exact_sequences": exact,
        "token_match_rate": round(matched / max(total, 1), 4),
        "first_mismatch_at": first_diffs,
    }


async def sglang_checks(engine, reference, concurrent: int = CONCURRENT) -> dict:
    streamed = {}
    for name in [*ADAPTERS, None]:
        request = requests()[0]
        request.adapter = name
        parts = [c async for c in engine.stream(request)]
        streamed[name or "base"] = {
            "text": "".join(c.text for c in parts),
            "chunks": len(parts),
            "ttft_ms": round(parts[-1].timings.ttft_s * 1000, 1),
        }
    single, single_s = await run_all(engine, one_by_one=True)
    mixed, mixed_s = await run_all(engine, one_by_one=False)
    report = {
        "streamed": streamed,
        "runtime_adapters": await runtime_adapter_checks(engine, single),
        "cancel": await cancel_check(engine),
        "mixed_batch_equals_single": mixed == single,
        "single_vs_cpu": compare(reference["tokens"], single),
        "mixed_vs_cpu": compare(reference["tokens"], mixed),
        "seconds": {"single": round(single_s, 2), "mixed_batch": round(mixed_s, 2)},
    }
    features = {}
    for name, check in [
        ("logprobs", lambda: logprobs_check(engine, single, reference.get("features"))),
        ("constraints", lambda: constraint_check(engine, single, reference.get("features"))),
        ("tokens_and_tools", lambda: tokens_and_tools_check(engine, reference.get("features"))),
        ("abort", lambda: abort_check(engine)),
        ("sampling_extensions", lambda: sampling_extensions_check(engine)),
        ("concurrent", lambda: concurrent_check(engine, concurrent)),
        ("context_fit", lambda: context_fit_check(engine)),
    ]:  # one failing check is a result; the others still run
        try:
            features[name] = await asyncio.wait_for(check(), timeout=180)
        except Exception as err:
            features[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"{name}: {json.dumps(features[name])[:600]}", flush=True)
    report["features"] = features
    report["ok"] = verdicts(report)
    return report


def verdicts(report: dict) -> dict[str, bool]:
    """Each check's pass/fail (what must hold on any GPU; token parity with the CPU is reported
    beside, since float16 rounding may flip a near-tie)."""
    f = report.get("features", {})
    lp, con, ab, cc, tt, ext, fit = (
        f.get(k, {})
        for k in (
            "logprobs", "constraints", "abort", "concurrent", "tokens_and_tools",
            "sampling_extensions", "context_fit",
        )
    )  # fmt: skip
    return {
        "streams": all(s["chunks"] > 1 for s in report["streamed"].values()),
        "hot_load": report["runtime_adapters"]["hot_loaded_equals_beta"]
        and report["runtime_adapters"]["unloaded_then_refused"],
        "cancel": report["cancel"]["running_after_cancel"] == 0
        and report["cancel"]["unload_after_cut"] == "ok",
        "cpu_parity": report["mixed_vs_cpu"]["token_match_rate"] >= 0.95,
        "logprobs": bool(lp.get("one_per_token") and lp.get("all_at_most_0")),
        "choice": bool(con.get("choice_answers_in_choices")),
        "json": bool(con.get("json_answers_parse")),
        "constraint_free_row_unchanged": bool(con.get("unconstrained_row_unchanged")),
        "abort": bool(ab.get("ended_with_request_ended_error") and ab.get("running_after") == 0)
        and ab.get("next_request_tokens", 0) > 0,
        "concurrent": bool(cc.get("every_token_delivered")),
        "tokenize": bool(tt.get("prompt_as_cpu") and tt.get("detokenized_back")),
        "tool_calls": bool(tt.get("named_parses") and tt.get("required_parses")),
        "sampling_extensions": bool(
            ext.get("min_tokens_held")
            and ext.get("penalty_changed_the_answer")
            and ext.get("min_p_1_is_greedy")
        ),
        "context_fit": bool(fit.get("fits")),
    }


async def logprobs_check(engine, single: dict, reference: dict | None) -> dict:
    """One entry per streamed token (none for a final end of turn), each ≤ 0, the greedy token
    its step's top choice."""
    request = logprob_request()
    chunks = [c async for c in engine.stream(request)]
    ids = [t for c in chunks for t in c.token_ids]
    entries = [e for c in chunks for e in c.logprobs or []]
    # none for the end-of-turn token that ended the answer (docs/api.md, as OpenAI's)
    answered = ids[:-1] if chunks[-1].finish_reason == "stop" and len(entries) < len(ids) else ids
    top_is_chosen = [bool(e.top) and e.top[0][0] == e.token_id for e in entries]
    out = {
        "tokens": len(ids),
        "entries": len(entries),
        "one_per_token": [e.token_id for e in entries] == answered and bool(answered),
        "all_at_most_0": all(e.logprob <= 1e-4 for e in entries),
        "greedy_token_is_top_rate": round(sum(top_is_chosen) / max(1, len(entries)), 3),
        "top_sizes": sorted({len(e.top) for e in entries}),
        "same_tokens_as_without_logprobs": ids == single[key(request)],
        "first": [[e.token_id, round(e.logprob, 4)] for e in entries[:4]],
    }
    if reference and reference.get("logprobs"):
        cpu = reference["logprobs"]
        same = [(g.logprob, c[1]) for g, c in zip(entries, cpu) if g.token_id == c[0]]
        out["vs_cpu_max_abs_diff"] = round(max((abs(a - b) for a, b in same), default=0), 4)
        out["vs_cpu_tokens_compared"] = len(same)
    return out


async def constraint_check(engine, single: dict, reference: dict | None) -> dict:
    """Choice and JSON-schema rows in one batch with an unconstrained one."""
    constrained = constrained_requests()
    plain = requests()[0]
    done = await engine.generate([*constrained.values(), plain])
    answers = dict(zip(constrained, done[:-1]))
    texts = {name: c.text for name, c in answers.items()}

    def parses(text: str) -> bool:
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return isinstance(value, dict) and set(value) == {"city", "country"}

    out = {
        "texts": texts,
        "finish_reasons": {name: c.finish_reason for name, c in answers.items()},
        "choice_answers_in_choices": all(
            texts[n] in CHOICES for n in texts if n.startswith("choice")
        ),
        "json_answers_parse": all(parses(texts[n]) for n in texts if n.startswith("json")),
        "unconstrained_row_unchanged": done[-1].token_ids == single[key(plain)],
    }
    if reference and reference.get("constrained"):
        cpu = reference["constrained"]
        out["vs_cpu_identical"] = {n: answers[n].token_ids == cpu.get(n) for n in answers}
    return out


async def tokens_and_tools_check(engine, reference: dict | None) -> dict:
    """``Engine.tokenize`` (a chat with a tool's result) against the CPU's ids and back through
    ``detokenize``; the calls of a named function and of ``required`` (the API's ``ToolPlan``
    grammar) parse as calls of the tool, in one batch."""
    from engine.api.protocol import ChatBody
    from engine.api.tools import tool_plan

    prompt, _ = await engine.tokenize(GenerationRequest(messages=TOOL_TURNS))
    text = await engine.detokenize(prompt)
    plans, requests = {}, []
    for name, choice in [("named", {"type": "function", "function": {"name": "get_weather"}}),
                         ("required", "required")]:  # fmt: skip
        body = ChatBody.model_validate({"model": "base", "messages": TOOL_TURNS[:1],
                                        "tools": [WEATHER], "tool_choice": choice})  # fmt: skip
        plans[name] = tool_plan(body)
        constraint = body.response_format.constraint()
        messages = plans[name].with_instructions([TOOL_TURNS[0]])
        requests.append(GenerationRequest(adapter="alpha", messages=messages,
                                          params=greedy(80, constraint=constraint)))  # fmt: skip
    done = dict(zip(plans, await engine.generate(requests)))

    def parses(name: str) -> bool:
        calls = plans[name].calls(done[name].text) or []
        try:
            args = [json.loads(c["function"]["arguments"]) for c in calls]
        except ValueError:
            return False
        names = {c["function"]["name"] for c in calls}
        return (
            bool(calls)
            and names == {"get_weather"}
            and all(set(a) == {"city", "unit"} for a in args)
        )

    cpu = (reference or {}).get("tool_turns_prompt")
    return {
        "prompt_tokens": len(prompt),
        "prompt_as_cpu": prompt == cpu if cpu is not None else None,
        "detokenized_back": "18 C and sunny" in text and "get_weather" in text,
        "texts": {name: c.text for name, c in done.items()},
        "named_parses": parses("named"),
        "required_parses": parses("required"),
    }


def long_story(adapter: str) -> GenerationRequest:
    """A stream that runs for 2000 tokens unless it is ended."""
    return GenerationRequest(
        adapter=adapter,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        params=greedy(2000, ignore_eos=True),
    )


async def abort_check(engine) -> dict:
    """``engine.abort`` on a running stream: the stream ends with RequestEndedError."""
    from engine.interface import RequestEndedError

    long = long_story("beta")
    stream = engine.stream(long)
    before = 0
    for _ in range(3):
        before += len((await stream.__anext__()).token_ids)
    engine.abort(long.request_id, "ended by gpu_check")
    after, outcome = 0, "the stream ran to its end"
    t0 = time.perf_counter()
    try:
        async for chunk in stream:
            after += len(chunk.token_ids)
    except RequestEndedError as err:
        outcome = f"RequestEndedError: {err}"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    ended_s = time.perf_counter() - t0
    await stream.aclose()
    running_after = await settled_running(engine)
    nxt = await engine.complete(requests()[0])
    return {
        "outcome": outcome,
        "ended_with_request_ended_error": outcome.startswith("RequestEndedError")
        and "ended by gpu_check" in outcome,
        "tokens_before_abort": before,
        "tokens_after_abort": after,
        "seconds_to_end": round(ended_s, 3),
        "running_after": running_after,
        "next_request_tokens": len(nxt.token_ids),
    }


async def sampling_extensions_check(engine) -> dict:
    """vLLM's and SGLang's ``min_tokens``, ``repetition_penalty``, ``min_p`` reach SGLang:
    no end of turn before ``min_tokens``; a penalty changes a repetitive answer; ``min_p = 1``
    at temperature 1 keeps only the likeliest token, so it answers as greedy does."""

    def ask(content: str, **kw) -> GenerationRequest:
        params = SamplingParams(max_tokens=kw.pop("max_tokens", 48), **kw)
        return GenerationRequest(messages=[{"role": "user", "content": content}], params=params)

    la = "Repeat: la la la la la la"
    short, plain = await engine.generate([ask("Say OK.", temperature=0.0), ask(la, temperature=0)])
    floor = short.usage.completion_tokens + 6
    longer, penalised, top_only = await engine.generate([
        ask("Say OK.", temperature=0.0, min_tokens=floor),
        ask(la, temperature=0.0, repetition_penalty=2.0),
        ask(la, temperature=1.0, min_p=1.0, seed=3),
    ])  # fmt: skip
    return {
        "short_tokens": short.usage.completion_tokens,
        "min_tokens_held": longer.usage.completion_tokens >= floor,
        "penalty_changed_the_answer": penalised.text != plain.text,
        "min_p_1_is_greedy": top_only.text == plain.text,
        "texts": {"plain": plain.text, "penalised": penalised.text, "min_p_1": top_only.text},
    }


async def context_fit_check(engine, room: int = 8) -> dict:
    """Prompts of NULs (a token each) without ``max_tokens``: one that leaves ``room`` tokens
    gets exactly the room less what the engine keeps back (``reserved_tokens``; ignore_eos),
    one of the engine's longest prompt is answered, one a token longer is a 400."""

    def nuls(count: int) -> GenerationRequest:
        messages = [{"role": "user", "content": "\0" * count}]
        params = resolve(None, temperature=0.0, ignore_eos=True)
        return GenerationRequest(messages=messages, params=params)

    async def answer(prompt_tokens: int):
        return [c async for c in engine.stream(nuls(prompt_tokens - overhead))][-1]

    ids, _ = await engine.tokenize(nuls(100))
    overhead, context = len(ids) - 100, engine.context_length
    fitted, longest = await answer(context - room), await answer(engine.longest_prompt)
    try:
        await answer(engine.longest_prompt + 1)
        refused = False
    except PromptTooLongError:
        refused = True
    expected = room - engine.reserved_tokens
    return {
        "room": room,
        "reserved": engine.reserved_tokens,
        "prompt_tokens": fitted.usage.prompt_tokens,
        "completion_tokens": fitted.usage.completion_tokens,
        "longest_prompt_tokens": [longest.usage.prompt_tokens, longest.usage.completion_tokens],
        "fits": fitted.usage.prompt_tokens == context - room
        and fitted.usage.completion_tokens == expected
        and fitted.finish_reason == "length"
        and longest.usage.completion_tokens >= 1
        and refused,
    }


async def concurrent_check(engine, count: int = CONCURRENT) -> dict:
    """``CONCURRENT`` streams at once (adapters and base mixed): each must deliver all its
    tokens, however the adaptive interval groups them into chunks."""
    names = [*ADAPTERS, None]
    batch = [
        GenerationRequest(
            adapter=names[i % len(names)],
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            params=greedy(CONCURRENT_TOKENS, ignore_eos=True),
        )
        for i in range(count)
    ]

    async def one(request) -> dict:
        chunks = [c async for c in engine.stream(request)]
        ids = [t for c in chunks for t in c.token_ids]
        last = chunks[-1]
        return {
            "tokens": len(ids),
            "usage": last.usage.completion_tokens if last.usage else None,
            "chunks": sum(bool(c.token_ids) for c in chunks),
            "finish": last.finish_reason,
            "text_ok": "".join(c.text for c in chunks)
            == engine.tokenizer.decode(ids, skip_special_tokens=True),
        }

    t0 = time.perf_counter()
    rows = await asyncio.gather(*(one(r) for r in batch))
    chunks = [r["chunks"] for r in rows]
    return {
        "streams": len(rows),
        "seconds": round(time.perf_counter() - t0, 2),
        "every_token_delivered": all(
            r["tokens"] == r["usage"] == CONCURRENT_TOKENS and r["finish"] == "length" for r in rows
        ),
        "short": [r for r in rows if r["tokens"] != CONCURRENT_TOKENS][:5],
        "chunks_min_max": [min(chunks), max(chunks)],
        "streams_in_fewer_chunks_than_tokens": sum(c < CONCURRENT_TOKENS for c in chunks),
        "text_equals_decoded_ids_rate": round(sum(r["text_ok"] for r in rows) / len(rows), 3),
    }


async def runtime_adapter_checks(engine, single: dict[str, list[int]]) -> dict:
    """Hot-load a copy of beta as gamma, use it, unload it; an unknown name is an error."""
    from engine import AdapterNotFoundError

    beta = requests()[len(PROMPTS)]
    await engine.load_adapter("gamma", str(Path(engine.adapter_paths["beta"])))
    gamma = GenerationRequest(adapter="gamma", messages=beta.messages, params=beta.params)
    gamma_tokens = (await engine.complete(gamma)).token_ids
    await engine.unload_adapter("gamma")
    try:
        await engine.complete(gamma)
        refused = False
    except AdapterNotFoundError:
        refused = True
    return {
        "hot_loaded_equals_beta": gamma_tokens == single[key(beta)],
        "unloaded_then_refused": refused,
        "adapters_after": engine.adapters(),
    }


async def settled_running(engine, seconds: float = 5) -> int:
    """Running requests once the engine has had ``seconds`` to drop ended ones (the CPU backend
    drops a finished row at its next step)."""
    for _ in range(int(seconds * 10)):
        if not engine.stats()["running"]:
            break
        await asyncio.sleep(0.1)
    return engine.stats()["running"]


async def cancel_check(engine) -> dict:
    """Leave a long stream after 3 chunks; the engine aborts it and goes on serving."""
    long = long_story("alpha")
    stream = engine.stream(long)
    for _ in range(3):
        await stream.__anext__()
    await stream.aclose()
    running = await settled_running(engine)
    after = await engine.complete(requests()[0])
    return {
        "running_after_cancel": running,
        "next_request_tokens": len(after.token_ids),
        "unload_after_cut": await unload_after_cut(engine, long),
    }


async def unload_after_cut(engine, long: GenerationRequest) -> str:
    """sglang#34205: a cut stream used to keep its adapter busy, so unloading it waited forever."""
    await engine.load_adapter("delta", str(Path(engine.adapter_paths["beta"])))
    stream = engine.stream(
        GenerationRequest(adapter="delta", messages=long.messages, params=long.params)
    )
    await stream.__anext__()
    await stream.aclose()
    try:
        await asyncio.wait_for(engine.unload_adapter("delta"), timeout=60)
        return "ok"
    except TimeoutError:
        return "hung"


def run(folder: Path, out: Path, dtypes: list[str]) -> bool:
    import torch

    from engine.backends.hf import HFEngine
    from engine.backends.sglang import SGLangEngine
    from engine.registry import SGLangSettings

    reference = json.loads((folder / "reference.json").read_text())
    base = resolve_base("smollm2")
    dirs = {n: str(folder / "adapters" / n) for n in ADAPTERS}
    report = {"gpu": torch.cuda.get_device_name(0), "reference": "hf backend, CPU, float32"}
    hf = HFEngine(base, "SmolLM2-135M-Instruct", adapters=dirs, dtype="float32", device="cuda")
    tokens, _ = asyncio.run(run_all(hf, one_by_one=False))
    report["hf_gpu_float32_vs_cpu"] = compare(reference["tokens"], tokens)
    asyncio.run(hf.shutdown())
    out.write_text(json.dumps(report, indent=1))
    settings = SGLangSettings(cuda_graph=False, mem_fraction_static=0.5, max_loras_per_batch=4)
    for dtype in dtypes:
        started = time.perf_counter()
        try:
            engine = SGLangEngine(base, "SmolLM2-135M-Instruct", dirs, settings, dtype=dtype)
            report[f"sglang_{dtype}"] = {"start_s": round(time.perf_counter() - started, 1)}
            report[f"sglang_{dtype}"] |= asyncio.run(sglang_checks(engine, reference))
            engine.engine.shutdown()
        except Exception as err:  # record and go on to the next dtype
            report[f"sglang_{dtype}"] = {"error": f"{type(err).__name__}: {err}"}
        out.write_text(json.dumps(report, indent=1))  # SGLang kills its parent if it crashes
        print(json.dumps({dtype: report[f"sglang_{dtype}"]}, indent=1), flush=True)
    failed = []
    for dtype in dtypes:
        ok = report[f"sglang_{dtype}"].get("ok") or {"engine": False}
        bad = [name for name, passed in ok.items() if not passed]
        failed += bad
        print(f"GPU CHECK {dtype}: {'PASS' if not bad else 'FAIL: ' + ', '.join(bad)}", flush=True)
    return not failed


def dry_run(folder: Path, out: Path, concurrent: int) -> bool:
    """Every check over the CPU backend: this script's logic, without a GPU."""
    from engine.backends.hf import HFEngine
    from engine.registry import HFSettings

    reference = json.loads((folder / "reference.json").read_text())
    dirs = {n: str(folder / "adapters" / n) for n in ADAPTERS}
    engine = HFEngine(
        resolve_base("smollm2"), "SmolLM2-135M-Instruct", adapters=dirs, device="cpu",
        settings=HFSettings(max_batch_size=32),
    )  # fmt: skip

    async def checks() -> dict:
        try:
            return await sglang_checks(engine, reference, concurrent)
        finally:
            await engine.shutdown()

    report = {"engine": "hf-cpu (dry run)"} | asyncio.run(checks())
    out.write_text(json.dumps(report, indent=1))
    bad = [name for name, passed in report["ok"].items() if not passed]
    print(f"DRY RUN: {'PASS' if not bad else 'FAIL: ' + ', '.join(bad)}", flush=True)
    return not bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["reference", "run", "dry-run"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--concurrent", type=int, default=CONCURRENT, help="dry-run: streams")
    args = parser.parse_args()
    if args.mode == "reference":
        make_reference(args.folder)
    elif args.mode == "dry-run":
        sys.exit(0 if dry_run(args.folder, args.out, args.concurrent) else 1)
    else:
        sys.exit(0 if run(args.folder, args.out, args.dtypes) else 1)


if __name__ == "__main__":
    main()
