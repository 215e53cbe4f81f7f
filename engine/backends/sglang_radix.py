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
lives in each scheduler process, which loads it through the general SGLang plugin ``loraland``
(``sglang_hooks``). Only SGLang's plain tree is batched: the hybrid, hierarchical and
chunk caches its own selection picks stay as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

from . import sglang_hooks

log = logging.getLogger(__name__)

BACKEND = "loraland-batched-evict"
"""The name this tree is registered under in SGLang's radix-cache registry."""
FRACTION_ENV = "LORALAND_RADIX_EVICT_FRACTION"
"""How the parent hands ``radix_evict_fraction`` to SGLang's scheduler processes."""
OTHER_TREES = (
    "disable_radix_cache",
    "radix_cache_backend",
    "enable_hierarchical_cache",
    "enable_int8_mamba_checkpoint",  # SGLang refuses any radix_cache_backend beside it
)
"""``extra`` keys that choose another tree: batched eviction then stays out of the way."""


def register() -> None:
    """Registers :data:`BACKEND` in this process where the parent asked for batched eviction
    (the plugin ``loraland`` calls it)."""
    if not os.environ.get(FRACTION_ENV):
        return
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
    if type(cache) is not RadixCache or cache.disable:
        log.warning("radix_evict_fraction not applied: SGLang picked %s", type(cache).__name__)
        return cache
    at_least = tokens_per_eviction(cache.token_to_kv_pool_allocator.size, fraction_from_env())
    cache.evict = functools.partial(evict_in_batches, cache.evict, at_least)
    log.info("prefix tree: each eviction frees at least %d tokens", at_least)
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
    """``radix_evict_fraction`` as the parent passed it (:func:`expose_to_schedulers`)."""
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
    if left_out := sglang_hooks.left_out_by_allow_list():
        found.append(left_out)
    return found


def engine_kwargs_for(fraction: float | None, extra: dict) -> dict:
    """The ``sglang.Engine`` keyword that picks this tree, or none (SGLang's own)."""
    if not fraction or blocked_by(extra):
        return {}
    return {"radix_cache_backend": BACKEND}


def ready(kwargs: dict, fraction: float | None, extra: dict) -> tuple[bool, str]:
    """Ready SGLang's processes for the tree ``kwargs`` picks: (a warning?, what to log)."""
    if kwargs.get("radix_cache_backend") != BACKEND:
        reasons = blocked_by(extra) if fraction else ["radix_evict_fraction: null"]
        return False, f"prefix tree: SGLang's own ({'; '.join(reasons)})"
    if not fraction:
        raise ValueError(f"radix_cache_backend {BACKEND} needs radix_evict_fraction")
    if not registry_found():
        del kwargs["radix_cache_backend"]
        return True, "radix_evict_fraction not applied: this SGLang has no radix-cache registry"
    expose_to_schedulers(fraction)
    return False, f"prefix tree: each eviction frees at least {fraction} of the KV pool"


def registry_found() -> bool:
    try:
        from sglang.srt.mem_cache import registry
    except ImportError:
        return False
    return all(
        hasattr(registry, name)
        for name in ("register_radix_cache_backend", "default_radix_cache_factory")
    )


def expose_to_schedulers(fraction: float) -> None:
    """Put the plugin on this process's path (spawned ones inherit it) and the fraction in the
    environment, where SGLang's scheduler processes find them."""
    os.environ[FRACTION_ENV] = repr(fraction)
    sglang_hooks.expose_plugin()
