"""SGLang backend logic that runs without a GPU: registry → Engine kwargs, chunks → deltas."""

from __future__ import annotations

import asyncio
import collections
import time
from collections import OrderedDict
from types import SimpleNamespace

import pytest

from engine.backends.sglang import (
    CUT_GRACE,
    DeltaTracker,
    DroppedRequestRelease,
    PendingAdapters,
    SGLangEngine,
    adaptive_interval,
    check_event_loop,
    engine_kwargs,
    environment_overrides,
    finish_reason,
    grace_left,
    matched_token,
    refusals_as_400,
    sampling_params,
)
from engine.interface import (
    AdapterConflictError,
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    RequestEndedError,
    SamplingParams,
)
from engine.registry import SGLANG_KWARGS_OF_FIELDS, SGLangSettings


def test_engine_kwargs_carry_the_registry_settings():
    settings = SGLangSettings(max_loras_per_batch=4, max_loaded_loras=6, cuda_graph=False)
    kwargs = engine_kwargs(settings, "/m", {"a": "/a", "b": "/b"})
    assert kwargs["model_path"] == "/m" and kwargs["enable_lora"] is True
    assert kwargs["lora_paths"] == [
        {"lora_name": "a", "lora_path": "/a", "pinned": False},
        {"lora_name": "b", "lora_path": "/b", "pinned": False},
    ]
    assert kwargs["max_loras_per_batch"] == 4 and kwargs["max_loaded_loras"] == 6
    assert kwargs["lora_backend"] == "csgmv" and kwargs["disable_cuda_graph"] is True
    assert kwargs["attention_backend"] == "triton" and kwargs["sampling_backend"] == "pytorch"
    assert kwargs["stream_interval"] == 1  # "auto": per request, 1 for the server
    assert kwargs["incremental_streaming_output"] is True
    assert kwargs["grammar_backend"] == "llguidance"
    assert engine_kwargs(SGLangSettings(stream_interval=4), "/m", {})["stream_interval"] == 4
    assert "max_lora_rank" not in kwargs and "chunked_prefill_size" not in kwargs


def test_running_requests_are_capped_at_256_unless_set_to_sglangs_own_limit():
    assert engine_kwargs(SGLangSettings(), "/m", {})["max_running_requests"] == 256
    assert (
        engine_kwargs(SGLangSettings(max_running_requests=64), "/m", {})["max_running_requests"]
        == 64
    )
    assert "max_running_requests" not in engine_kwargs(
        SGLangSettings(max_running_requests=None), "/m", {}
    )
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        SGLangSettings(max_running_requests=0)


def test_sglangs_delayer_variables_that_override_the_registry_are_named():
    assert environment_overrides({}) == []
    environ = {"SGLANG_PREFILL_DELAYER_MAX_DELAY_PASSES": "3", "SGLANG_OTHER": "1",
               "SGLANG_SCHEDULER_DECREASE_PREFILL_IDLE": ""}  # fmt: skip
    assert environment_overrides(environ) == ["SGLANG_PREFILL_DELAYER_MAX_DELAY_PASSES=3"]


def test_prefill_delayer_is_on_at_8_passes_unless_set_to_null():
    kwargs = engine_kwargs(SGLangSettings(), "/m", {})
    assert kwargs["enable_prefill_delayer"] is True
    assert kwargs["prefill_delayer_max_delay_passes"] == 8
    for passes in (2, 4):  # 2: the least that ever delays (SGLang waits fewer than N passes)
        chosen = engine_kwargs(SGLangSettings(prefill_delay_passes=passes), "/m", {})
        assert chosen["prefill_delayer_max_delay_passes"] == passes
    off = engine_kwargs(SGLangSettings(prefill_delay_passes=None), "/m", {})
    assert "enable_prefill_delayer" not in off and "prefill_delayer_max_delay_passes" not in off
    for bad in (1, 0, "eight"):
        with pytest.raises(ValueError, match="prefill_delay_passes"):
            SGLangSettings(prefill_delay_passes=bad)


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"extra": {"disable_overlap_schedule": True}}, "disable_overlap_schedule in extra"),
        ({"extra": {"pp_size": 2}}, "pp_size > 1 in extra"),
        ({"extra": {"enable_pdmux": True}}, "enable_pdmux in extra"),
        ({"dp_size": 2}, "dp_size 2 (without enable_dp_attention"),
    ],
)
def test_auto_turns_the_delayer_off_where_it_does_not_work_and_a_number_is_refused(
    settings, reason
):
    auto = SGLangSettings(**settings)
    assert auto.prefill_delay is None and reason in auto.delayer_conflicts()[0]
    assert "enable_prefill_delayer" not in engine_kwargs(auto, "/m", {})
    with pytest.raises(ValueError, match=r"prefill_delay_passes 8 does not work with .*set it to"):
        SGLangSettings(prefill_delay_passes=8, **settings)
    assert SGLangSettings(prefill_delay_passes=None, **settings).prefill_delay is None


def test_where_the_delayer_works_auto_keeps_it():
    for fine in (
        {"extra": {"disable_overlap_schedule": False, "pp_size": 1}},
        {"tp_size": 2},
        {"dp_size": 2, "extra": {"enable_dp_attention": True}},
        {"extra": {"pp_size": "two"}},  # not a number: SGLang's own check answers that one
    ):
        assert SGLangSettings(**fine).prefill_delay == 8, fine
    with pytest.raises(ValueError, match="enable_prefill_delayer: set by a field"):
        SGLangSettings(extra={"enable_prefill_delayer": False})


def test_extra_cannot_set_what_a_field_sets():
    with pytest.raises(ValueError, match="max_running_requests, tp_size: set by a field"):
        SGLangSettings(extra={"tp_size": 2, "max_running_requests": 512, "log_level": "info"})
    every_optional = SGLangSettings(
        max_loaded_loras=8, max_lora_rank=8, lora_target_modules=["q_proj"], chunked_prefill_size=8
    )
    assert set(engine_kwargs(every_optional, "/m", {"a": "/a"})) == SGLANG_KWARGS_OF_FIELDS | {
        "log_level",  # kwargs of ours that extra may change: SGLang's own logs,
        "radix_cache_backend",  # another prefix tree (batched eviction then stays out)
    }


def test_more_adapters_than_max_loaded_start_with_the_first_ones():
    settings = SGLangSettings(max_loras_per_batch=1, max_loaded_loras=2)
    kwargs = engine_kwargs(settings, "/m", {n: f"/{n}" for n in "abcd"})
    assert [p["lora_name"] for p in kwargs["lora_paths"]] == ["a", "b"]


def test_no_adapters_still_enables_hot_loading_and_extra_passes_through():
    settings = SGLangSettings(extra={"enable_metrics": True, "max_lora_chunk_size": 32})
    kwargs = engine_kwargs(settings, "/m", {})
    assert kwargs["max_lora_rank"] == 64 and kwargs["lora_target_modules"] == ["all"]
    assert kwargs["enable_metrics"] is True and kwargs["max_lora_chunk_size"] == 32


def test_sampling_params_translate():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_k=0, stop=["\n"], seed=3)
    out = sampling_params(params)
    assert out["max_new_tokens"] == 7 and out["temperature"] == 0.5
    assert out["top_k"] == -1 and out["stop"] == ["\n"] and out["sampling_seed"] == 3
    assert "stop" not in sampling_params(SamplingParams())
    assert sampling_params(params, {2, 1})["stop_token_ids"] == [1, 2]
    assert "stop_token_ids" not in sampling_params(SamplingParams(ignore_eos=True), {1, 2})
    assert "stream_interval" not in out and sampling_params(params, None, 4)["stream_interval"] == 4


def test_penalties_bias_and_constraints_reach_sglang():
    from engine.constraints import ResponseFormat

    choice = ResponseFormat(type="choice", choices=["spam", "ham"]).constraint()
    params = SamplingParams(
        presence_penalty=0.5, frequency_penalty=-0.2, logit_bias={7: -100.0}, constraint=choice
    )
    out = sampling_params(params)
    assert out["presence_penalty"] == 0.5 and out["frequency_penalty"] == -0.2
    assert out["logit_bias"] == {"7": -100.0} and out["regex"] == "(spam|ham)"
    schema = ResponseFormat(
        type="json_schema", json_schema={"name": "x", "schema": {"type": "object"}}
    )
    assert sampling_params(SamplingParams(constraint=schema.constraint()))["json_schema"] == (
        '{"type": "object"}'
    )


def test_sampling_extensions_reach_sglang_under_its_names_only_when_set():
    out = sampling_params(SamplingParams(min_p=0.1, repetition_penalty=1.3, min_tokens=4))
    assert out["min_p"] == 0.1 and out["repetition_penalty"] == 1.3
    assert out["min_new_tokens"] == 4
    plain = sampling_params(SamplingParams())
    assert not {"min_p", "repetition_penalty", "min_new_tokens"} & set(plain)


def test_an_unload_waits_out_the_grace_after_its_adapters_last_cut_stream():
    assert grace_left(None, 100.0) == 0.0  # never cut: at once
    assert grace_left(99.8, 100.0, grace=1.0) == pytest.approx(0.8)
    assert grace_left(90.0, 100.0, grace=1.0) == 0.0


class FakeSGLang:
    """sglang.Engine's surface the backend drives: streams that run until aborted, unloads."""

    def __init__(self):
        self.cut: set[str] = set()
        self.generated: list[str] = []
        self.unloaded_at: float | None = None
        self.tokenizer_manager = SimpleNamespace(
            event_loop=None, abort_request=self.cut.add, rid_to_state={}
        )

    async def async_generate(self, rid, **_):
        self.generated.append(rid)

        async def outputs():
            while rid not in self.cut:
                await asyncio.sleep(0.01)
                yield {"output_ids": [7], "text": "x", "meta_info": {}}
            yield {"output_ids": [], "text": "", "meta_info": {"finish_reason": {"type": "abort"}}}

        return outputs()

    async def async_unload_lora_adapter(self, name):
        self.unloaded_at = time.monotonic()
        return SimpleNamespace(success=True)


def backend_over(fake: FakeSGLang, tokenize) -> SGLangEngine:
    """The SGLang backend without its GPU engine (``__init__`` starts one)."""
    engine = object.__new__(SGLangEngine)
    engine.engine, engine.tokenizer, engine.stop_ids, engine.context = fake, None, set(), 4096
    engine.names, engine.adapter_paths, engine.changing = {"a"}, {"a": "/a"}, set()
    engine.base_dir = "/base"
    engine.pending, engine.running, engine.adaptive = PendingAdapters({}), 0, False
    engine.aborted, engine.cut_at, engine.streams_on = {}, {}, collections.Counter()
    engine.prompt_tokenizer = tokenize
    return engine


async def three_ids(_request):
    return [1, 2, 3]


def test_an_unload_waits_for_the_adapters_streams_and_then_the_grace_after_the_cut():
    async def scenario():
        fake = FakeSGLang()
        engine = backend_over(fake, three_ids)
        request = GenerationRequest(adapter="a", prompt="hi", params=SamplingParams(max_tokens=50))
        stream = engine.stream(request)
        await anext(stream)
        unloading = asyncio.ensure_future(engine.unload_adapter("a"))
        await asyncio.sleep(0.3)
        assert fake.unloaded_at is None and "a" not in engine.adapters()
        with pytest.raises(AdapterConflictError, match="being loaded or unloaded"):
            await engine.load_adapter("a", "/a")  # SGLang still holds it: a 409, not SGLang's
        engine.abort(request.request_id, "adapter 'a' was unloaded")  # the API's deadline
        with pytest.raises(RequestEndedError, match="unloaded"):
            async for _ in stream:
                pass
        cut = time.monotonic()
        await unloading
        assert fake.unloaded_at - cut >= CUT_GRACE * 0.99

    asyncio.run(scenario())


def test_an_abort_or_unload_during_tokenization_ends_the_request_before_sglang_sees_it():
    async def scenario():
        fake, release = FakeSGLang(), asyncio.Event()

        async def slow_tokenize(_request):
            await release.wait()
            return [1, 2, 3]

        engine = backend_over(fake, slow_tokenize)
        aborted = GenerationRequest(adapter="a", prompt="hi")
        unloaded = GenerationRequest(adapter="a", prompt="hi")
        streams = [engine.stream(aborted), engine.stream(unloaded)]
        waiting = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.sleep(0.05)
        engine.abort(aborted.request_id, "ended by the drain")
        unloading = asyncio.ensure_future(engine.unload_adapter("a"))
        await asyncio.sleep(0.05)
        release.set()
        with pytest.raises(RequestEndedError, match="drain"):
            await waiting[0]
        with pytest.raises(EngineError, match="a"):
            await waiting[1]
        await unloading
        assert fake.generated == [] and engine.streams_on["a"] == 0

    asyncio.run(scenario())


def test_an_abort_before_sglang_knows_the_request_id_still_ends_the_stream():
    """SGLang drops an abort for an id it has not registered; the stream checks its own."""

    async def scenario():
        fake = FakeSGLang()
        fake.tokenizer_manager.abort_request = lambda rid: None  # an id it does not know yet
        engine = backend_over(fake, three_ids)
        request = GenerationRequest(adapter="a", prompt="hi", params=SamplingParams(max_tokens=50))
        stream = engine.stream(request)
        await anext(stream)
        engine.abort(request.request_id, "ended by the drain")

        async def drain():
            async for _ in stream:
                pass

        with pytest.raises(RequestEndedError, match="drain"):
            await asyncio.wait_for(drain(), 30)
        assert engine.streams_on["a"] == 0 and not engine.aborted

    asyncio.run(scenario())


def test_sglang_refusing_a_request_is_a_400_and_other_errors_are_not():
    async def refused(**_):
        async def outputs():
            raise ValueError("top_k must be -1 or positive")
            yield

        return outputs()

    async def scenario():
        fake = FakeSGLang()
        engine = backend_over(fake, three_ids)
        fake.async_generate = refused
        with pytest.raises(InvalidRequestError, match="SGLang refused the request: top_k"):
            await engine.complete(GenerationRequest(adapter="a", prompt="hi"))

        async def fails_later():
            async def outputs():
                yield {"output_ids": [7], "text": "x", "meta_info": {}}
                raise ValueError("a bug after the start")

            return outputs()

        seen = []
        with pytest.raises(ValueError, match="a bug after the start"):
            async for out in refusals_as_400(fails_later()):
                seen.append(out)
        assert len(seen) == 1

    asyncio.run(scenario())


def test_adaptive_stream_interval_keeps_a_lone_stream_token_by_token():
    assert [adaptive_interval(n) for n in (0, 1, 63, 64, 128, 255, 256, 511, 512, 4096)] == [
        1, 1, 1, 1, 2, 3, 4, 7, 8, 8,
    ]  # fmt: skip


def test_incremental_outputs_add_up_with_their_logprobs():
    class Tokenizer:
        def decode(self, ids):
            return {1: "Hel", 2: "lo", 3: " world"}[ids[0]]

    tracker = DeltaTracker(Tokenizer())
    assert tracker.update({"text": "Hel", "output_ids": [1]}) == ("Hel", [1])
    assert tracker.update({"text": "lo world", "output_ids": [2, 3]}) == ("lo world", [2, 3])
    assert tracker.update({"text": None, "output_ids": []}) == ("", [])
    assert tracker.ids == [1, 2, 3]
    meta = {
        "output_token_logprobs": [(-0.1, 2, None), (-0.5, 3, None)],
        "output_top_logprobs": [[(-0.1, 2, None), (-2.0, 1, None)], [(-0.5, 3, None)]],
    }
    entries = tracker.logprobs(meta, 1)
    assert [(e.token_id, e.text, e.logprob) for e in entries] == [
        (2, "lo", -0.1),
        (3, " world", -0.5),
    ]
    assert entries[0].top == [(2, "lo", -0.1)]


def test_finish_reasons():
    assert finish_reason({"finish_reason": None}) is None
    assert finish_reason({"finish_reason": {"type": "stop", "matched": 2}}) == "stop"
    assert finish_reason({"finish_reason": {"type": "length", "length": 8}}) == "length"
    assert finish_reason({"finish_reason": {"type": "abort", "message": "x"}}) == "abort"
    assert matched_token({"finish_reason": {"type": "stop", "matched": 2}}) == 2
    assert matched_token({"finish_reason": {"type": "stop", "matched": "###"}}) is None
    assert matched_token({"finish_reason": {"type": "length", "length": 8}}) is None
    assert matched_token({"finish_reason": None}) is None


def test_a_request_from_another_event_loop_is_refused_not_left_waiting():
    first = asyncio.new_event_loop()
    first.close()  # what a finished asyncio.run leaves behind
    running = asyncio.new_event_loop()
    check_event_loop(None, running)  # nothing bound yet: SGLang binds to this one
    check_event_loop(running, running)
    with pytest.raises(EngineError, match="one event loop"):
        check_event_loop(first, running)
    running.close()


def test_adapters_beyond_max_loaded_load_once_however_many_requests_arrive_together():
    loaded = []

    async def load(name, path):
        await asyncio.sleep(0.01)
        loaded.append((name, path))

    async def many_requests():
        pending = PendingAdapters({"e": "/e", "f": "/f"})
        await asyncio.gather(*(pending.ensure(load) for _ in range(20)))
        await pending.ensure(load)  # later requests: nothing left to do
        return pending.adapters

    assert asyncio.run(many_requests()) == {}
    assert loaded == [("e", "/e"), ("f", "/f")]


class AbortReq:
    def __init__(self, rid):
        self.rid = rid


class Request:
    def __init__(self, lora_id):
        self.lora_id, self.lora_path = lora_id, lora_id and f"adapter-{lora_id}"


class State:
    def __init__(self, lora_id):
        self.obj = Request(lora_id)


class Registry:
    def __init__(self):
        self.released = []

    async def release(self, lora_id):
        self.released.append(lora_id)


class Dispatcher:
    """SGLang 0.5.17's sglang.utils.TypeBasedDispatcher: an ordered dict, plus an MRO cache."""

    def __init__(self, mapping):
        self._mapping = OrderedDict(mapping)
        self._mro_cache = {}

    def __call__(self, obj):
        fn = self._mapping.get(type(obj)) or self._mro_cache.get(type(obj))
        if fn is None:
            fn = next(fn for kind, fn in self._mapping.items() if isinstance(obj, kind))
            self._mro_cache[type(obj)] = fn
        return fn(obj)


class Manager:
    """The parts of SGLang 0.5.17's TokenizerManager that drop a request's state."""

    def __init__(self, states):
        self.rid_to_state = dict(states)
        self.child_rid_to_logical_rid = {}
        self.lora_registry = Registry()
        self._result_dispatcher = Dispatcher([(AbortReq, self._handle_abort_req)])

    def _handle_abort_req(self, recv_obj):  # aborted in the waiting queue: no release
        self.rid_to_state.pop(recv_obj.rid, None)

    def _discard_pending_req_states(self, obj, lifecycle_ids=None):  # stream closed early
        self.rid_to_state.pop(obj.rid, None)

    def finish(self, rid):  # the normal last output: removes the state and releases
        state = self.rid_to_state.pop(rid)
        asyncio.get_running_loop().create_task(self.lora_registry.release(state.obj.lora_id))


def test_adapters_of_dropped_requests_are_released_once_and_only_theirs():
    manager = Manager({"cut": State("A"), "queued": State("B"), "base": State(None),
                       "done": State("C")})  # fmt: skip

    async def drop_them():
        assert DroppedRequestRelease(manager).install()
        manager.finish("done")
        manager._discard_pending_req_states(AbortReq("cut"))  # a client left mid-stream
        manager._result_dispatcher(AbortReq("queued"))  # the output loop's route
        manager._result_dispatcher(AbortReq("cut"))  # the scheduler's echo, state already gone
        manager._discard_pending_req_states(AbortReq("base"))
        manager._discard_pending_req_states(AbortReq("done"))
        await asyncio.sleep(0)

    asyncio.run(drop_them())
    assert sorted(manager.lora_registry.released) == ["A", "B", "C"]
    assert manager.rid_to_state == {}


def test_a_request_dropped_after_the_loop_stopped_is_left_alone():
    manager = Manager({"late": State("A")})
    assert DroppedRequestRelease(manager).install()
    manager._discard_pending_req_states(AbortReq("late"))  # no running loop: no error
    assert manager.rid_to_state == {} and manager.lora_registry.released == []


def test_an_unknown_tokenizer_manager_is_left_alone():
    assert DroppedRequestRelease(object()).install() is False


def test_the_engine_calls_keep_their_meaning_on_sglang():
    """Engine's public calls are not redefined with another shape: ``generate`` (a batch →
    completions, used by the evaluator and the benchmarks) was once shadowed by the backend's
    per-request stream, and broke only on the GPU."""
    from engine.backends.sglang import SGLangEngine
    from engine.interface import Engine

    for name in ("generate", "complete", "health", "check_adapter"):
        assert getattr(SGLangEngine, name) is getattr(Engine, name), name


def test_stats_give_the_kv_pools_size_from_sglangs_start_up_handshake():
    fake = FakeSGLang()
    engine = backend_over(fake, three_ids)
    assert engine.stats()["kv_pool_tokens"] is None  # an SGLang that keeps it elsewhere
    handshake = {"status": "ready", "max_total_num_tokens": 741_000, "max_req_input_len": 32_762}
    fake._scheduler_init_result = SimpleNamespace(scheduler_infos=[handshake])  # Engine's own
    assert engine.stats()["kv_pool_tokens"] == 741_000
