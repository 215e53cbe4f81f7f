"""The prefill delayer waiting for a minimum number of free slots: the hook on its decision, the
setting's rules, what the parent tells SGLang's processes, and (where sglang is installed)
SGLang's own delayer deciding with the hook after SGLang's plugin loading."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import inspect
import multiprocessing
import os
import re
import socket
import sys

import pytest
from pydantic import ValidationError

from engine.backends import sglang_hooks, sglang_prefill_slots
from engine.backends.sglang import engine_kwargs
from engine.registry import SGLangSettings

needs_sglang = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None, reason="needs sglang (the GPU machine)"
)


class Delayer:
    """The decision's signature as SGLang 0.5.17's ``PrefillDelayer`` declares it."""

    def _negotiate_should_allow_prefill_pure(
        self,
        prev_state,
        local_prefillable: bool,
        token_usage: float,
        running_batch: int = 0,
        max_prefill_bs: int = 0,
        max_running_requests: int = 0,
        waiting_queue_len: int = 0,
    ):
        return max_prefill_bs


def decided_with(min_slots: int, *args, **kwargs) -> int:
    """The mark the decision sees once the hook ran on this call."""
    decision = Delayer._negotiate_should_allow_prefill_pure
    args, kwargs = sglang_prefill_slots.with_min_slots(
        inspect.signature(decision), min_slots, *args, **kwargs
    )
    return decision(*args, **kwargs)


def test_a_mark_below_the_least_is_raised_to_it_as_sglang_calls_the_decision():
    call = dict(prev_state=None, local_prefillable=True, token_usage=0.9, running_batch=250,
                max_running_requests=256, waiting_queue_len=3)  # fmt: skip
    assert decided_with(32, Delayer(), **call, max_prefill_bs=3) == 32
    assert decided_with(32, Delayer(), **call, max_prefill_bs=80) == 80  # above: as it was


def test_the_mark_is_raised_passed_by_position_or_left_to_its_default():
    assert decided_with(16, Delayer(), None, True, 0.9, 250, 4, 256, 3) == 16
    assert decided_with(16, Delayer(), None, True, 0.9, max_running_requests=256) == 16


def test_the_least_is_at_most_half_the_cap_the_decision_is_given():
    """SGLang may lower its cap below the registry's (a small KV pool): the delayer then still
    waits only while more than half its slots are in use."""
    call = dict(prev_state=None, local_prefillable=True, token_usage=0.9, running_batch=20,
                max_prefill_bs=3, waiting_queue_len=3)  # fmt: skip
    assert decided_with(32, Delayer(), **call, max_running_requests=24) == 12
    assert decided_with(32, Delayer(), None, True, 0.9, 20, 3, 24, 3) == 12
    assert decided_with(32, Delayer(), None, True, 0.9) == 0  # no cap given: none to wait for


def test_the_hook_fits_sglangs_decision_and_not_one_without_the_slot_figures():
    assert sglang_prefill_slots.misfit_of(Delayer) is None

    class Renamed:
        def _negotiate_should_allow_prefill_pure(self, prev_state, running_bs, max_bs):
            return max_bs

    class Without:
        pass

    assert sglang_prefill_slots.misfit_of(Renamed) == (
        "_negotiate_should_allow_prefill_pure takes no running_batch, max_prefill_bs, "
        "max_running_requests"
    )
    assert "defines no method" in sglang_prefill_slots.misfit_of(Without)


@pytest.fixture
def an_sglang_that_fits(monkeypatch):
    monkeypatch.setattr(sglang_hooks, "hook_registry_found", lambda: True)
    monkeypatch.setattr(sglang_prefill_slots, "decision_misfit", lambda: None)


def test_the_least_reaches_sglangs_processes_where_the_delayer_is_on(
    clean_environment, an_sglang_that_fits
):
    settings = SGLangSettings(prefill_delay_min_slots=32)
    kwargs = engine_kwargs(settings, "/m", {})
    assert sglang_prefill_slots.ready(kwargs, settings.prefill_delay_min_slots) == (
        False, "prefill delayer: waits for at least 32 free slots near the cap (at most half of "
        "each scheduler's cap)"
    )  # fmt: skip
    assert os.environ[sglang_prefill_slots.MIN_SLOTS_ENV] == "32"
    assert str(sglang_hooks.PLUGIN_DIR) in sys.path


def test_off_by_default_and_an_earlier_engines_least_cleared(clean_environment):
    os.environ[sglang_prefill_slots.MIN_SLOTS_ENV] = "32"  # an earlier engine of this process
    settings = SGLangSettings()
    assert settings.prefill_delay_min_slots is None
    warn, note = sglang_prefill_slots.ready(engine_kwargs(settings, "/m", {}), None)
    assert not warn and "SGLang's free-slots rule" in note
    assert os.environ[sglang_prefill_slots.MIN_SLOTS_ENV] == ""


@pytest.mark.parametrize(
    "why, fits, allowed, said",
    [
        ("delayer off", True, "", "SGLang's prefill delayer is off"),
        ("allow-list", True, "other", "leaves out the plugin 'loraland'"),
        ("misfit", False, "", "takes no max_prefill_bs"),
    ],
)
def test_where_it_cannot_apply_it_says_so_and_keeps_sglangs_rule(
    clean_environment, an_sglang_that_fits, monkeypatch, why, fits, allowed, said
):
    kwargs = engine_kwargs(SGLangSettings(prefill_delay_min_slots=32), "/m", {})
    if why.startswith("delayer off"):
        kwargs["enable_prefill_delayer"] = False
    if allowed:
        monkeypatch.setenv("SGLANG_PLUGINS", allowed)
    if not fits:
        misfit = "_negotiate_should_allow_prefill_pure takes no max_prefill_bs"
        monkeypatch.setattr(sglang_prefill_slots, "decision_misfit", lambda: misfit)
    warn, note = sglang_prefill_slots.ready(kwargs, 32)
    assert warn and note.startswith("prefill_delay_min_slots not applied") and said in note
    assert os.environ[sglang_prefill_slots.MIN_SLOTS_ENV] == ""


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prefill_delay_passes": None},
         "off here (prefill_delay_passes: null): set prefill_delay_min_slots to null"),
        ({"dp_size": 2}, "off here (dp_size 2 (without enable_dp_attention"),  # auto: off
        ({"max_running_requests": 48},
         "at most half of each scheduler's max_running_requests (48)"),
        ({"dp_size": 4, "extra": {"enable_dp_attention": True}},
         "max_running_requests (256 ÷ dp_size 4 = 64)"),
        ({"prefill_delay_passes": None, "dp_size": 2}, "off here (prefill_delay_passes: null)"),
        ({"extra": {"prefill_delayer_queue_min_ratio": 0.5}}, "queue trigger"),
        ({"prefill_delay_min_slots": 0}, "greater than or equal to 1"),
    ],
)  # fmt: skip
def test_a_least_the_delayer_cannot_serve_is_refused(fields, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        SGLangSettings(**{"prefill_delay_min_slots": 40, **fields})


def test_a_least_up_to_half_the_cap_is_taken():
    assert SGLangSettings(prefill_delay_min_slots=128).prefill_delay_min_slots == 128
    with pytest.raises(ValidationError, match="at most half"):
        SGLangSettings(prefill_delay_min_slots=129)
    unbounded = SGLangSettings(prefill_delay_min_slots=999, max_running_requests=None)
    assert unbounded.prefill_delay_min_slots == 999  # SGLang's own cap: half of it in the hook


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is here")
def test_the_plugin_reaches_for_sglang_only_where_the_parent_asked(clean_environment):
    assert sglang_prefill_slots.register() is None
    os.environ[sglang_prefill_slots.MIN_SLOTS_ENV] = "32"
    with pytest.raises(ModuleNotFoundError, match="sglang"):
        sglang_prefill_slots.register()


def test_a_least_not_a_whole_number_is_refused_in_the_scheduler(clean_environment):
    os.environ[sglang_prefill_slots.MIN_SLOTS_ENV] = "0.5"
    with pytest.raises(ValueError, match="whole number"):
        sglang_prefill_slots.register()


def sglangs_delayer_decisions(hooked: bool, running: int, cap: int) -> list[tuple[bool, str]]:
    """SGLang's own delayer, one rank (a gloo group of one), deciding two passes at ``running``
    of ``cap`` with a mark of 2, after SGLang's plugin loading (the hook on if ``hooked``)."""
    from types import SimpleNamespace

    import torch.distributed
    from sglang.srt.managers.prefill_delayer import PrefillDelayer
    from sglang.srt.plugins import load_plugins

    if not hooked:
        os.environ[sglang_prefill_slots.MIN_SLOTS_ENV] = ""
    load_plugins()  # what SGLang's scheduler process does first
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    server_args = SimpleNamespace(
        prefill_delayer_queue_min_ratio=None, prefill_delayer_max_delay_ms=None,
        enable_dp_attention=False, disable_overlap_schedule=False,
    )  # fmt: skip
    delayer = PrefillDelayer(
        dp_size=1, attn_tp_size=1, cpu_group=torch.distributed.group.WORLD,
        server_args=server_args, max_delay_passes=8, token_usage_low_watermark=None,
    )  # fmt: skip
    decisions = []
    for _ in range(2):  # SGLang lets the first pass that meets its rule through
        out = delayer._negotiate_should_allow_prefill(
            local_prefillable=True, token_usage=0.9, running_batch=running, max_prefill_bs=2,
            max_running_requests=cap, waiting_queue_len=3,
        )  # fmt: skip
        decisions.append((out.output_allow, out.output_reason))
    return decisions


@needs_sglang
def test_the_hook_fits_this_sglangs_prefill_delayer():
    assert sglang_prefill_slots.decision_misfit() is None


WAITS = [(True, "no_wait"), (False, "delay")]  # SGLang lets the first pass that would wait go
NO_WAIT = [(True, "no_wait"), (True, "no_wait")]


@needs_sglang
@pytest.mark.parametrize(
    "hooked, running, cap, decisions",
    [
        (False, 250, 256, NO_WAIT),  # SGLang's rule: 6 free slots >= its mark of 2
        (True, 250, 256, WAITS),  # 6 free < 32
        (True, 200, 256, NO_WAIT),  # 56 free >= 32: away from the cap, as before
        (True, 20, 24, WAITS),  # SGLang's cap lowered to 24: 4 free < 12, half of it
        (True, 10, 24, NO_WAIT),  # 14 free >= 12
    ],
)
def test_sglangs_delayer_waits_for_the_least_after_its_plugin_loading(
    clean_environment, hooked, running, cap, decisions
):
    kwargs = engine_kwargs(SGLangSettings(prefill_delay_min_slots=32), "/m", {})
    sglang_prefill_slots.ready(kwargs, 32)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as child:
        decided = child.submit(sglangs_delayer_decisions, hooked, running, cap)
        assert decided.result(timeout=600) == decisions


def test_the_engines_start_notes_say_the_delayer_waits_for_the_least(
    clean_environment, an_sglang_that_fits, monkeypatch
):
    from engine import lora_kernels
    from engine.backends.sglang import ready_our_parts

    monkeypatch.delenv(lora_kernels.ENV, raising=False)  # a user's tuned folder; restored after
    monkeypatch.delenv(lora_kernels.SET_HERE, raising=False)
    settings = SGLangSettings(prefill_delay_min_slots=32, lora_kernel_configs=None)
    notes = [note for _, note in ready_our_parts(settings, engine_kwargs(settings, "/m", {}))]
    assert len(notes) == 4  # tree, indices, delayer, kernels: what bench records as start_notes
    assert (
        "prefill delayer: waits for at least 32 free slots near the cap (at most half of each "
        "scheduler's cap)" in notes
    )
    assert "csgmv LoRA kernels: SGLang's own block sizes (lora_kernel_configs: null)" in notes
