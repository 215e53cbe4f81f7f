"""The general SGLang plugin ``loraland``: what it does in each of SGLang's processes.

SGLang finds general plugins by entry point (group ``sglang.srt.plugins``) and calls each in
the processes that load plugins (the engine's own and each scheduler process) before it
serves. Ours is the ``.dist-info`` in ``sglang_plugin/``, on ``sys.path`` once
:func:`expose_plugin` ran in the parent (spawned processes inherit the path). What it turns on
there the parent says through environment variables: batched evictions from the prefix tree
(``sglang_radix``), the LoRA batch's indices built without SGLang's per-adapter loop
(``sglang_lora_batch``) and the prefill delayer waiting for a minimum number of free slots
(``sglang_prefill_slots``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PLUGIN = "loraland"
"""The entry point's name (what ``SGLANG_PLUGINS``, SGLang's allow-list, must name)."""
PLUGIN_DIR = Path(__file__).with_name("sglang_plugin")
"""Holds the plugin's ``.dist-info``: SGLang finds general plugins by entry point."""
FEATURES = ("sglang_radix", "sglang_lora_batch", "sglang_prefill_slots")
"""This package's modules the plugin registers, each with its ``register()``."""


def register() -> None:
    """SGLang's general-plugin entry point: each feature the parent turned on, in this process;
    one that fails leaves the other in place (SGLang would log the plugin failed and go on)."""
    for feature in FEATURES:
        try:
            importlib.import_module(f"{__package__}.{feature}").register()
        except Exception:
            log.exception("the SGLang plugin %s: %s not registered", PLUGIN, feature)


def left_out_by_allow_list() -> str | None:
    """Why SGLang will not load the plugin (``SGLANG_PLUGINS`` names others), or None."""
    allowed = os.environ.get("SGLANG_PLUGINS", "")
    if allowed and PLUGIN not in {name.strip() for name in allowed.split(",")}:
        return f"SGLANG_PLUGINS={allowed} leaves out the plugin '{PLUGIN}'"
    return None


def expose_plugin() -> None:
    """Put the plugin on this process's path, where SGLang's spawned processes find it."""
    if str(PLUGIN_DIR) not in sys.path:
        sys.path.append(str(PLUGIN_DIR))


def hook_registry_found() -> bool:
    """Whether the SGLang installed has the plugin hook registry (SGLang 0.5.17 has)."""
    try:
        return importlib.util.find_spec("sglang.srt.plugins.hook_registry") is not None
    except ImportError:
        return False


def why_hooks_cannot_apply(misfit: Callable[[], str | None]) -> str | None:
    """Why a feature's hooks cannot apply in SGLang's processes (the allow-list leaves the
    plugin out, no hook registry, ``misfit()`` names where SGLang differs), or None."""
    if left_out := left_out_by_allow_list():
        return left_out
    if not hook_registry_found():
        return "this SGLang has no plugin hook registry"
    return misfit()
