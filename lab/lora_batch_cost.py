"""What building the LoRA batch's indices costs SGLang's scheduler per forward pass.

    python -m lab.lora_batch_cost --out /tmp/lora-batch-cost     # needs sglang and a GPU

SGLang's csgmv backend prepares each batch (``ChunkedSgmvLoRABackend.prepare_lora_batch``, the
call its scheduler makes before every forward pass) with its own code and with the hooks of
``engine/backends/sglang_lora_batch.py``, alternated over rounds: a decode batch of 256 requests
over 128 adapters (the CUDA-graph path) and an extend batch of 32 prompts of ~100 tokens, the
latter with ``--busy-ms`` of GPU work queued before each call, as the overlap scheduler has the
previous batch's forward queued (SGLang's lm_head copy waits for it; the queue is sized at the
GPU's top clock, so it may run a little longer). Wall time per call on the calling thread (what
the scheduler's thread spends on it, waiting included), median [range] of the rounds' means,
after a warm-up round of each arm. Writes ``lora-batch-cost.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

from engine.backends.sglang_lora_batch import HOOKS
from lab.radix_evict_cost import arm_table

ADAPTERS = 128


def backend(max_bs: int):
    """SGLang's csgmv backend as the engine builds it, with its decode CUDA-graph buffers."""
    import torch
    from sglang.srt.lora.backend.chunked_backend import ChunkedSgmvLoRABackend

    built = ChunkedSgmvLoRABackend(
        ADAPTERS, torch.device("cuda"), SimpleNamespace(max_lora_chunk_size=16)
    )
    built.init_cuda_graph_batch_info(max_bs_in_cuda_graph=max_bs, num_tokens_per_req=1)
    return built


def batch(mode: str, requests: int, rng: random.Random):
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    tokens = [1] * requests if mode == "decode" else [rng.randint(90, 110) for _ in range(requests)]
    return SimpleNamespace(
        forward_mode=ForwardMode.DECODE if mode == "decode" else ForwardMode.EXTEND,
        batch_size=requests,
        extend_seq_lens_cpu=tokens,
        extend_seq_lens=torch.tensor(tokens, dtype=torch.int32, device="cuda"),
        extend_num_tokens=sum(tokens),
        return_logprob=False,
        lora_ids=[None] * requests,
    )


class Hooks:
    """Our hooks on SGLang's class, as its hook registry wraps them, on and off at will."""

    def __init__(self):
        from sglang.srt.lora.backend.chunked_backend import ChunkedSgmvLoRABackend

        self.cls = ChunkedSgmvLoRABackend
        self.originals = {name: self.cls.__dict__[name] for name in HOOKS}

    def on(self, on: bool) -> None:
        for name, original in self.originals.items():
            setattr(self.cls, name, self.wrapped(original, HOOKS[name]) if on else original)

    @staticmethod
    def wrapped(original, hook):
        if isinstance(original, staticmethod):
            inner = original.__func__
            return staticmethod(lambda *args, **kwargs: hook(inner, *args, **kwargs))
        return lambda *args, **kwargs: hook(original, *args, **kwargs)


def seconds_per_call(prepared, mode: str, calls: int, busy_ms: float, seed: int) -> float:
    import torch

    rng = random.Random(seed)
    requests = 256 if mode == "decode" else 32
    ranks, scalings = [8] * ADAPTERS, [2.0] * ADAPTERS
    spent = []
    for _ in range(calls):
        forward = batch(mode, requests, rng)
        weight_indices = [rng.randrange(ADAPTERS) for _ in range(requests)]
        torch.cuda.synchronize()
        if busy_ms:
            torch.cuda._sleep(int(busy_ms * 1e-3 * cycles_per_second()))
        start = time.perf_counter()
        prepared.prepare_lora_batch(
            forward, weight_indices, ranks, scalings, use_cuda_graph=mode == "decode"
        )
        spent.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.mean(spent)


def cycles_per_second() -> float:
    import torch

    return torch.cuda.get_device_properties(0).clock_rate * 1e3  # kHz


def measure(mode: str, calls: int, rounds: int, busy_ms: float) -> dict:
    hooks, prepared = Hooks(), backend(256)
    arms = {"sglang": [], "vectorised": []}
    for arm in arms:  # the first calls allocate pinned blocks and warm the allocator
        hooks.on(arm == "vectorised")
        seconds_per_call(prepared, mode, max(1, calls // 10), busy_ms, seed=-1)
    for round_ in range(rounds):
        order = ["sglang", "vectorised"] if round_ % 2 == 0 else ["vectorised", "sglang"]
        for arm in order:
            hooks.on(arm == "vectorised")
            arms[arm].append(seconds_per_call(prepared, mode, calls, busy_ms, round_) * 1e6)
    hooks.on(False)
    ratios = [s / v for s, v in zip(arms["sglang"], arms["vectorised"])]
    return {"batch": mode, "busy_ms": busy_ms, "us_per_call": arms, "sglang_over_ours": ratios}


def report(rows: list[dict]) -> str:
    header = ["batch", "GPU work queued", "SGLang µs/call, median [range]", "vectorised µs/call",
              "SGLang ÷ vectorised"]  # fmt: skip
    cells = [([row["batch"], f"{row['busy_ms']} ms"], row["us_per_call"], row["sglang_over_ours"])
             for row in rows]  # fmt: skip
    return arm_table(header, cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy-ms", type=float, default=5.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode, busy_ms in (("decode", 0.0), ("extend", 0.0), ("extend", args.busy_ms)):
        rows.append(measure(mode, args.calls, args.rounds, busy_ms))
        print(report(rows[-1:]).splitlines()[-1], flush=True)
    (args.out / "lora-batch-cost.json").write_text(json.dumps(rows, indent=1))
    (args.out / "lora-batch-cost.md").write_text(report(rows))


if __name__ == "__main__":
    main()
