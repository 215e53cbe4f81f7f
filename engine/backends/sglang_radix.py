"""SGLang's prefix tree with evictions in batches: one heap of the cached requests per batch.

SGLang 0.5.17's ``RadixCache.evict`` builds a heap of every evictable leaf (every cached request
that nothing running shares) each time it is called, and frees only the tokens asked for. Once
random prompts have filled the KV pool, every decode step asks for its batch's few hundred
slots, so the scheduler's one thread builds a heap of thousands of leaves per step (on an H200
with a 7B model: ~700k cached tokens, ~3k leaves; twice that with an FP8 KV cache). Where the
scheduler's thread bounds the step (FP8 weights), that cost is throughput.

Here every eviction frees at least ``radix_evict_fraction`` of the pool, least recently used
first as SGLang does, so one heap serves many steps; the cache holds that much less on average.
SGLang picks this tree through its radix-cache registry (``radix_cache_backend``); the registry
lives in each scheduler process, which loads it as a general SGLang plugin: the entry point in
``sglang_plugin/`` (on ``sys.path`` once :func:`plugin_path_added` ran in the parent; spawned
processes inherit the path). Only SGLang's plain tree is batched: the hybrid, hierarchical and
chunk caches its own selection picks stay as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path

BACKEND = "loraland-batched-evict"
"""The name this tree is registered under in SGLang's radix-cache registry."""
PLUGIN = "loraland"
"""The entry point's name (what ``SGLANG_PLUGINS``, SGLang's allow-list, must name)."""
FRACTION_ENV = "LORALAND_RADIX_EVICT_FRACTION"
"""How the parent hands ``radix_evict_fraction`` to SGLang's scheduler processes."""
PLUGIN_DIR = Path(__file__).with_name("sglang_plugin")
"""Holds the plugin's ``.dist-info``: SGLang finds general plugins by entry point."""
OTHER_TREES = ("disable_radix_cache", "radix_cache_backend", "enable_hierarchical_cache")
"""``extra`` keys that choose another tree: batched eviction then stays out of the way."""


def register() -> None:
    """SGLang's general-plugin entry point: registers :data:`BACKEND` in this process."""
    from sglang.srt.mem_cache.registry import (
        register_radix_cache_backend,
        registered_radix_cache_backends,
    )

    if BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(BACKEND, build_tree_cache)


def build_tree_cache(ctx):
    """SGLang's own choice of tree, its plain ``RadixCache`` made to evict in batches."""
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    cache = default_radix_cache_factory(ctx)
    if type(cache) is RadixCache and not cache.disable:
        pool = cache.token_to_kv_pool_allocator.size
        cache.evict = functools.partial(
            evict_in_batches, cache.evict, tokens_per_eviction(pool, fraction_from_env())
        )
    return cache


def evict_in_batches(evict, at_least: int, params):
    """Call ``evict`` for at least ``at_least`` tokens where a few were asked for."""
    if 0 < params.num_tokens < at_least:
        params = dataclasses.replace(params, num_tokens=at_least)
    return evict(params)


def tokens_per_eviction(pool_tokens: int, fraction: float) -> int:
    """The least one eviction frees: ``fraction`` of the pool, at least one token."""
    return max(1, int(pool_tokens * fraction))


def fraction_from_env() -> float:
    value = os.environ.get(FRACTION_ENV, "")
    try:
        fraction = float(value)
    except ValueError:
        raise ValueError(f"{FRACTION_ENV} must be a fraction, not {value!r}") from None
    if not 0 < fraction < 1:
        raise ValueError(f"{FRACTION_ENV} must be in (0, 1), not {fraction}")
    return fraction


def blocked_by(extra: dict) -> list[str]:
    """Why batched eviction stays off under these ``extra`` settings (none: it can be on)."""
    found = [key for key in OTHER_TREES if extra.get(key)]
    allowed = os.environ.get("SGLANG_PLUGINS", "")
    if allowed and PLUGIN not in {name.strip() for name in allowed.split(",")}:
        found.append(f"SGLANG_PLUGINS={allowed} leaves out the plugin '{PLUGIN}'")
    return found


def engine_kwargs_for(fraction: float | None, extra: dict) -> dict:
    """The ``sglang.Engine`` keyword that picks this tree, or none (SGLang's own)."""
    if not fraction or blocked_by(extra):
        return {}
    return {"radix_cache_backend": BACKEND}


def plugin_path_added(fraction: float) -> None:
    """Make the plugin findable here and in the processes SGLang spawns; pass the fraction."""
    os.environ[FRACTION_ENV] = repr(fraction)
    if str(PLUGIN_DIR) not in sys.path:
        sys.path.append(str(PLUGIN_DIR))
