"""SGLang backend on a GPU vs the CPU backend: same adapters, same prompts, greedy tokens compared.

On the CPU machine (makes two random peft adapters and the CPU backend's greedy reference):
    python lab/gpu_check.py reference .gpu/check
On the GPU machine (with the offline SGLang runtime on PYTHONPATH):
    python lab/gpu_check.py run .gpu/check --out $OUT/gpu_check.json

The run starts ``SGLangEngine`` with both adapters, streams one completion per adapter and the
base, sends a mixed batch (alpha, beta, base, ...) at once, and compares every row's greedy tokens
with the CPU reference. It does so for each dtype given (bfloat16 is the default on GPU; float16
keeps more mantissa bits; SGLang 0.5.17 has no float32 rmsnorm) and runs the HF backend on the
GPU in float32 as a control.
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


def requests() -> list[GenerationRequest]:
    return [
        GenerationRequest(
            adapter=adapter,
            messages=[{"role": "user", "content": prompt}],
            params=SamplingParams(max_tokens=MAX_TOKENS),
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
    asyncio.run(engine.shutdown())
    (folder / "reference.json").write_text(json.dumps({"backend": "hf-cpu-fp32", "tokens": tokens}))
    print(f"reference: {len(tokens)} generations in {seconds:.1f}s → {folder / 'reference.json'}")


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


async def sglang_checks(engine, reference) -> dict:
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
    return {
        "streamed": streamed,
        "runtime_adapters": await runtime_adapter_checks(engine, single),
        "cancel": await cancel_check(engine),
        "mixed_batch_equals_single": mixed == single,
        "single_vs_cpu": compare(reference, single),
        "mixed_vs_cpu": compare(reference, mixed),
        "seconds": {"single": round(single_s, 2), "mixed_batch": round(mixed_s, 2)},
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


async def cancel_check(engine) -> dict:
    """Leave a long stream after 3 chunks; the engine aborts it and goes on serving."""
    long = GenerationRequest(
        adapter="alpha",
        messages=[{"role": "user", "content": "Tell me a long story."}],
        params=SamplingParams(max_tokens=2000, ignore_eos=True),
    )
    stream = engine.stream(long)
    for _ in range(3):
        await stream.__anext__()
    await stream.aclose()
    after = await engine.complete(requests()[0])
    return {
        "running_after_cancel": engine.stats()["running"],
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


def run(folder: Path, out: Path, dtypes: list[str]) -> None:
    import torch

    from engine.backends.hf import HFEngine
    from engine.backends.sglang import SGLangEngine
    from engine.registry import SGLangSettings

    reference = json.loads((folder / "reference.json").read_text())["tokens"]
    base = resolve_base("smollm2")
    dirs = {n: str(folder / "adapters" / n) for n in ADAPTERS}
    report = {"gpu": torch.cuda.get_device_name(0), "reference": "hf backend, CPU, float32"}
    hf = HFEngine(base, "SmolLM2-135M-Instruct", adapters=dirs, dtype="float32", device="cuda")
    tokens, _ = asyncio.run(run_all(hf, one_by_one=False))
    report["hf_gpu_float32_vs_cpu"] = compare(reference, tokens)
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
    print(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["reference", "run"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    args = parser.parse_args()
    if args.mode == "reference":
        make_reference(args.folder)
    else:
        run(args.folder, args.out, args.dtypes)


if __name__ == "__main__":
    main()
