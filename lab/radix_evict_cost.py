"""What SGLang's prefix tree costs the scheduler per decode step once the KV pool is full.

    python -m lab.radix_evict_cost --out /tmp/radix-evict-cost     # needs sglang; CPU only

A tree of N cached requests fills a real token allocator; then each simulated decode step takes
256 slots (evicting the shortfall, as SGLang's ``evict_from_tree_cache`` does) and a finished
request goes back into the tree, so the tree stays full. Per step: SGLang's eviction (the heap of
every leaf per call) against ``engine/backends/sglang_radix.py``'s batches (1 % of the pool per
eviction), alternated over rounds. Writes ``radix-evict-cost.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from array import array
from pathlib import Path
from types import SimpleNamespace

from engine.backends.sglang_radix import FRACTION_ENV, build_tree_cache

STEP_TOKENS = 256
REQUEST_TOKENS = 230


def filled_tree(requests: int, tokens: int, batched: bool):
    """SGLang's tree (``batched``: through our factory) over a full token allocator."""
    import torch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext, default_radix_cache_factory

    allocator = TokenToKVPoolAllocator(requests * tokens, torch.int64, "cpu", None, False)
    context = TreeCacheBuildContext(
        server_args=SimpleNamespace(enable_lmcache=False, enable_flexkv=False),
        params=CacheInitParams(False, None, allocator, page_size=1),
        is_hybrid_swa=False,
        is_hybrid_ssm=False,
        enable_hierarchical_cache=False,
        disable_radix_cache=False,
        effective_chunked_prefill_size=None,
        tp_worker=None,
        model_config=None,
        tp_size=1,
        tp_rank=0,
        tp_group=None,
    )
    tree = (build_tree_cache if batched else default_radix_cache_factory)(context)
    for request in range(requests):
        tree.insert(InsertParams(key=request_key(request, tokens), value=allocator.alloc(tokens)))
    return tree, allocator


def request_key(request: int, tokens: int):
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return RadixKey(array("q", range(request * tokens, (request + 1) * tokens)), extra_key=None)


def step_seconds(tree, allocator, steps: int, first_request: int) -> list[float]:
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams

    seconds = []
    for step in range(steps):
        start = time.perf_counter()
        shortfall = STEP_TOKENS - allocator.available_size()
        if shortfall > 0:
            tree.evict(EvictParams(num_tokens=shortfall))
        slots = allocator.alloc(STEP_TOKENS)
        seconds.append(time.perf_counter() - start)
        key = request_key(first_request + step, STEP_TOKENS)
        tree.insert(InsertParams(key=key, value=slots))
    return seconds


def measure(requests: int, steps: int, rounds: int) -> dict:
    arms = {"sglang": [], "batched": []}
    for round_ in range(rounds):
        order = ["sglang", "batched"] if round_ % 2 == 0 else ["batched", "sglang"]
        for arm in order:
            tree, allocator = filled_tree(requests, REQUEST_TOKENS, arm == "batched")
            per_step = step_seconds(tree, allocator, steps, first_request=10 * requests)
            arms[arm].append(statistics.mean(per_step) * 1e6)
    ratios = [s / b for s, b in zip(arms["sglang"], arms["batched"])]
    return {"cached_requests": requests, "us_per_step": arms, "sglang_over_batched": ratios}


def report(rows: list[dict]) -> str:
    header = ["cached requests", "SGLang µs/step, median [range]", "batched µs/step",
              "SGLang ÷ batched"]  # fmt: skip
    cells = [([str(row["cached_requests"])], row["us_per_step"], row["sglang_over_batched"])
             for row in rows]  # fmt: skip
    return arm_table(header, cells)


def arm_table(header: list[str], rows: list[tuple[list[str], dict, list[float]]]) -> str:
    """A markdown table: each row's own cells, then its :func:`arm_cells`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for labels, per_arm, ratios in rows:
        lines.append(f"| {' | '.join([*labels, arm_cells(per_arm, ratios)])} |")
    return "\n".join(lines) + "\n"


def arm_cells(per_arm: dict[str, list[float]], ratios: list[float]) -> str:
    """Table cells: each arm's µs, then their ratio, as median [range] over rounds."""
    cells = [median_range(values, 0) for values in per_arm.values()]
    return " | ".join([*cells, median_range(ratios, 1)])


def median_range(values: list[float], digits: int) -> str:
    median, low, high = statistics.median(values), min(values), max(values)
    return f"{median:.{digits}f} [{low:.{digits}f}–{high:.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, nargs="+", default=[1000, 3000, 6000])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault(FRACTION_ENV, "0.01")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for requests in args.requests:
        rows.append(measure(requests, args.steps, args.rounds))
        print(report(rows[-1:]).splitlines()[-1], flush=True)
    (args.out / "radix-evict-cost.json").write_text(json.dumps(rows, indent=1))
    (args.out / "radix-evict-cost.md").write_text(report(rows))


if __name__ == "__main__":
    main()
