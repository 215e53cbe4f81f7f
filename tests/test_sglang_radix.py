"""Batched evictions from SGLang's prefix tree: the plugin SGLang finds, the settings that pick
it, and (where sglang is installed) SGLang's own tree evicting through it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.metadata
import importlib.util
import multiprocessing
import os
import sys

import pytest

from engine.backends import sglang_hooks, sglang_radix
from engine.backends.sglang import engine_kwargs
from engine.registry import SGLangSettings
from lab.radix_evict_cost import filled_tree, request_key

needs_sglang = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None, reason="needs sglang (the GPU machine)"
)


@pytest.fixture
def plugin_on_path(clean_environment):
    sglang_radix.expose_to_schedulers(0.01)


def test_sglang_finds_the_plugin_by_its_entry_point_once_the_path_is_added(plugin_on_path):
    found = importlib.metadata.entry_points(group="sglang.srt.plugins")
    assert sglang_hooks.PLUGIN in found.names
    assert found[sglang_hooks.PLUGIN].load() is sglang_hooks.register
    assert sglang_radix.fraction_from_env() == 0.01


def test_the_batched_tree_is_the_default_and_none_leaves_sglangs(clean_environment):
    on = engine_kwargs(SGLangSettings(), "/m", {})
    assert on["radix_cache_backend"] == sglang_radix.BACKEND
    off = engine_kwargs(SGLangSettings(radix_evict_fraction=None), "/m", {})
    assert "radix_cache_backend" not in off
    assert sglang_radix.ready(off, None, {}) == (
        False,
        "prefix tree: SGLang's own (radix_evict_fraction: null)",
    )


def test_the_tree_named_in_extra_without_a_fraction_is_refused():
    kwargs = {"radix_cache_backend": sglang_radix.BACKEND}
    with pytest.raises(ValueError, match="needs radix_evict_fraction"):
        sglang_radix.ready(kwargs, None, kwargs)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is here")
def test_an_sglang_without_the_registry_keeps_its_own_tree(clean_environment):
    kwargs = {"radix_cache_backend": sglang_radix.BACKEND}
    warn, note = sglang_radix.ready(kwargs, 0.01, {})
    assert warn and "no radix-cache registry" in note
    assert kwargs == {}
    assert os.environ[sglang_radix.FRACTION_ENV] == ""


def test_a_ready_tree_is_exposed_to_the_schedulers(monkeypatch, plugin_on_path):
    monkeypatch.setattr(sglang_radix, "registry_found", lambda: True)
    kwargs = {"radix_cache_backend": sglang_radix.BACKEND}
    assert sglang_radix.ready(kwargs, 0.05, {}) == (
        False, "prefix tree: each eviction frees at least 0.05 of the KV pool"
    )  # fmt: skip
    assert sglang_radix.fraction_from_env() == 0.05


@pytest.mark.parametrize(
    "extra",
    [
        {"disable_radix_cache": True},
        {"enable_hierarchical_cache": True},
        {"enable_int8_mamba_checkpoint": True},
    ],
)
def test_another_tree_in_extra_keeps_sglangs_choice(clean_environment, extra):
    settings = SGLangSettings(radix_evict_fraction=0.01, extra=extra)
    assert "radix_cache_backend" not in engine_kwargs(settings, "/m", {})
    assert list(extra) == sglang_radix.blocked_by(extra)
    assert (
        sglang_radix.ready({}, 0.01, extra)[1] == f"prefix tree: SGLang's own ({next(iter(extra))})"
    )


def test_a_tree_named_in_extra_wins(clean_environment):
    settings = SGLangSettings(radix_evict_fraction=0.01, extra={"radix_cache_backend": "mine"})
    assert engine_kwargs(settings, "/m", {})["radix_cache_backend"] == "mine"


def test_an_allow_list_without_the_plugin_keeps_sglangs_tree(monkeypatch):
    monkeypatch.setenv("SGLANG_PLUGINS", "someone_else")
    settings = SGLangSettings(radix_evict_fraction=0.01)
    assert "radix_cache_backend" not in engine_kwargs(settings, "/m", {})
    assert "leaves out the plugin 'loraland'" in sglang_radix.blocked_by({})[0]
    monkeypatch.setenv("SGLANG_PLUGINS", "someone_else, loraland")
    assert engine_kwargs(settings, "/m", {})["radix_cache_backend"] == sglang_radix.BACKEND


@pytest.mark.parametrize("fraction", [0, 1, -0.5, 2])
def test_the_fraction_is_a_share_of_the_pool(fraction):
    with pytest.raises(ValueError, match="radix_evict_fraction"):
        SGLangSettings(radix_evict_fraction=fraction)


@pytest.mark.parametrize("value", ["", "half", "0", "1.5"])
def test_a_bad_fraction_in_the_environment_is_an_error(monkeypatch, value):
    monkeypatch.setenv(sglang_radix.FRACTION_ENV, value)
    with pytest.raises(ValueError, match=sglang_radix.FRACTION_ENV):
        sglang_radix.fraction_from_env()


@dataclasses.dataclass
class Asked:
    num_tokens: int = 0
    mamba_num: int = 0


@pytest.mark.parametrize(("asked", "evicted"), [(5, 700), (699, 700), (700, 700), (900, 900)])
def test_a_small_eviction_is_raised_to_the_batch(asked, evicted):
    calls = []
    sglang_radix.evict_in_batches(calls.append, 700, Asked(num_tokens=asked))
    assert [call.num_tokens for call in calls] == [evicted]


def test_an_eviction_of_no_tokens_stays_one_of_no_tokens():
    calls = []
    sglang_radix.evict_in_batches(calls.append, 700, Asked(num_tokens=0, mamba_num=1))
    assert calls == [Asked(num_tokens=0, mamba_num=1)]


def test_the_batch_is_the_fraction_of_the_pool_and_at_least_one_token():
    assert sglang_radix.tokens_per_eviction(740_000, 0.01) == 7_400
    assert sglang_radix.tokens_per_eviction(50, 0.01) == 1


@needs_sglang
def test_sglangs_tree_frees_the_batch_least_recently_used_first(monkeypatch):
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams

    monkeypatch.setenv(sglang_radix.FRACTION_ENV, "0.1")
    tree, allocator = filled_tree(requests=100, tokens=50, batched=True)
    assert allocator.available_size() == 0
    assert tree.evict(EvictParams(num_tokens=5)).num_tokens_evicted == 500
    assert allocator.available_size() == 500
    assert tree.evictable_size() == 100 * 50 - 500
    matched = {
        request: tree.match_prefix(MatchPrefixParams(key=request_key(request, 50)))
        for request in (0, 99)
    }
    assert {request: len(m.device_indices) for request, m in matched.items()} == {0: 0, 99: 50}


def plugins_and_fraction_seen_here() -> tuple[list[str], float]:
    found = importlib.metadata.entry_points(group="sglang.srt.plugins")
    return sorted(found.names), sglang_radix.fraction_from_env()


def test_a_process_spawned_as_sglang_spawns_its_scheduler_finds_both(plugin_on_path):
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as child:
        names, fraction = child.submit(plugins_and_fraction_seen_here).result(timeout=600)
    assert sglang_hooks.PLUGIN in names
    assert fraction == 0.01


def trees_registered_by_sglangs_plugin_loading() -> list[str]:
    from sglang.srt.mem_cache.registry import registered_radix_cache_backends
    from sglang.srt.plugins import load_plugins

    load_plugins()  # what SGLang's scheduler process does first
    return registered_radix_cache_backends()


@needs_sglang
def test_sglangs_plugin_loading_registers_the_tree_in_a_spawned_process(plugin_on_path):
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as child:
        trees = child.submit(trees_registered_by_sglangs_plugin_loading).result(timeout=600)
    assert sglang_radix.BACKEND in trees


def test_the_tree_is_registered_only_where_the_parent_asked(clean_environment, monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang.srt.mem_cache.registry", None)  # importing it fails
    sglang_radix.register()
    monkeypatch.setenv(sglang_radix.FRACTION_ENV, "0.01")
    with pytest.raises(ImportError):
        sglang_radix.register()
