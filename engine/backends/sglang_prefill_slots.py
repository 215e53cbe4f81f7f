"""SGLang's prefill delayer waiting for a minimum number of free slots, however requests arrive.

Near ``max_running_requests`` SGLang 0.5.17's prefill delayer holds new requests back (fewer
than ``prefill_delay_passes`` forward passes) while fewer slots are free than the largest
prefill of the last few hundred passes took (``max_prefill_bs``: a high-water mark that decays
0.2 % a pass). Where requests arrive spread out, as HTTP clients send them, the prefills stay
small, so does the mark, and the delayer waits little: more, smaller prefill passes, each
launching every layer's attention eagerly on the scheduler's one thread (read from SGLang's
code; the delayer's decisions were not recorded). With FP8 weights at 256 streams on an H200,
base and 128 adapters, a prefill's launches took 15–16 % of that thread's samples through HTTP
against 7 % engine-direct (``results/serving/h200-7b-scheduler-http-vs-direct``).

Here the delayer decides with a mark of at least ``prefill_delay_min_slots`` (at most half the
cap it is given): near the cap it waits for that many free slots (or its passes), whatever the
arrivals; with half the slots or more free it does not wait, as before. A ``BEFORE`` hook on the
delayer's decision, through SGLang's plugin hook registry, in each process that loads the
plugin ``loraland`` (``sglang_hooks``) while the parent's environment says so.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

from . import sglang_hooks

log = logging.getLogger(__name__)

MIN_SLOTS_ENV = "LORALAND_PREFILL_MIN_SLOTS"
"""How the parent hands ``prefill_delay_min_slots`` to SGLang's processes (empty: not asked)."""
DELAYER_CLASS = "sglang.srt.managers.prefill_delayer.PrefillDelayer"
DECISION = "_negotiate_should_allow_prefill_pure"
"""The delayer's decision for one pass, from the scheduler's figures: the hooked method."""
MARK = "max_prefill_bs"
CAP = "max_running_requests"
SLOT_FIGURES = ("running_batch", MARK, CAP)
"""The decision's parameters its free-slots rule reads (the hook needs them by these names)."""


def with_min_slots(signature: inspect.Signature, min_slots: int, *args, **kwargs):
    """The decision's arguments with its high-water mark raised to ``min_slots``, at most half
    the slots the decision is given (SGLang may lower its cap below the registry's)."""
    if MARK in kwargs and CAP in kwargs:  # how SGLang 0.5.17 calls it: no binding needed
        kwargs[MARK] = max(kwargs[MARK], least_for(min_slots, kwargs[CAP]))
        return args, kwargs
    call = signature.bind(*args, **kwargs)
    call.apply_defaults()
    marks = call.arguments
    marks[MARK] = max(marks[MARK], least_for(min_slots, marks[CAP]))
    return call.args, call.kwargs


def least_for(min_slots: int, cap: int) -> int:
    """The free slots to wait for under this cap: never more than half of them, so the delayer
    only waits while more than half the slots are in use."""
    return min(min_slots, cap // 2)


def register() -> None:
    """Registers the hook in SGLang's hook registry where the parent asked for it (the plugin
    ``loraland`` calls this in each process that loads plugins; SGLang applies it next)."""
    if not os.environ.get(MIN_SLOTS_ENV):
        return
    min_slots = min_slots_from_env()
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if misfit := decision_misfit():
        log.warning("prefill_delay_min_slots not applied: %s", misfit)
        return
    decision = getattr(delayer_class(), DECISION)
    hook = functools.partial(with_min_slots, inspect.signature(decision), min_slots)
    HookRegistry.register(f"{DELAYER_CLASS}.{DECISION}", hook, HookType.BEFORE)


def delayer_class() -> type:
    from sglang.srt.managers.prefill_delayer import PrefillDelayer

    return PrefillDelayer


def decision_misfit() -> str | None:
    """Where this SGLang's prefill delayer differs from what the hook needs (None: it fits)."""
    try:
        delayer = delayer_class()
    except Exception as error:  # whatever keeps it from loading keeps SGLang's own
        return f"SGLang's prefill delayer does not load ({type(error).__name__}: {error})"
    return misfit_of(delayer)


def misfit_of(delayer: type) -> str | None:
    method = delayer.__dict__.get(DECISION)
    if not inspect.isfunction(method):
        return f"the prefill delayer defines no method {DECISION}"
    names = inspect.signature(method).parameters
    if missing := [name for name in SLOT_FIGURES if name not in names]:
        return f"{DECISION} takes no {', '.join(missing)}"
    return None


def min_slots_from_env() -> int:
    """``prefill_delay_min_slots`` as the parent passed it (:func:`ready`)."""
    value = os.environ.get(MIN_SLOTS_ENV, "")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{MIN_SLOTS_ENV} must be a whole number >= 1, not {value!r}")
    return int(value)


def ready(kwargs: dict, min_slots: int | None) -> tuple[bool, str]:
    """Tell SGLang's processes whether to apply the hook: (a warning?, what to log)."""
    os.environ[MIN_SLOTS_ENV] = ""
    if min_slots is None:
        return False, "prefill delayer: SGLang's free-slots rule (prefill_delay_min_slots: null)"
    if not kwargs.get("enable_prefill_delayer"):
        return True, "prefill_delay_min_slots not applied: SGLang's prefill delayer is off"
    if blocked := sglang_hooks.why_hooks_cannot_apply(decision_misfit):
        return True, f"prefill_delay_min_slots not applied: {blocked}"
    os.environ[MIN_SLOTS_ENV] = str(min_slots)
    sglang_hooks.expose_plugin()
    return False, (
        f"prefill delayer: waits for at least {min_slots} free slots near the cap (at most half "
        "of each scheduler's cap)"
    )
