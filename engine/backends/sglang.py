"""GPU backend: an embedded ``sglang.Engine`` with multi-LoRA batching (``sglang==0.5.17``).

Adapters from the registry are passed as ``lora_paths``; SGLang batches requests for different
adapters together (up to ``max_loras_per_batch`` distinct ones per batch), keeps at most
``max_loaded_loras`` in memory with LRU eviction, and hot-loads/unloads at run time.
SGLang's stream chunks are cumulative; ``DeltaTracker`` turns them into deltas.
``sglang.Engine`` spawns processes: scripts that build this backend need a
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from pathlib import Path

from ..constraints import grammar_problem
from ..interface import (
    AdapterLoadError,
    Chunk,
    Engine,
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    RequestClock,
    RequestEndedError,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from ..lora_kernels import kernels_note, use_tuned_kernels
from ..registry import SGLangSettings
from ..text import end_of_turn_ids, token_text
from . import sglang_lora_batch, sglang_prefill_slots, sglang_radix
from .common import PromptTokenizer, Tokenizes, check_loadable, fit_to_context, holding

log = logging.getLogger(__name__)
UNSUPPORTED_FLOAT32 = (
    "SGLang 0.5.17 cannot run float32 (its rmsnorm kernel has no float32 path and the scheduler "
    "dies); use bfloat16 (auto) or float16, which matches the CPU backend's greedy tokens closely"
)


DELAYER_ENVIRONMENT = (
    "SGLANG_SCHEDULER_DECREASE_PREFILL_IDLE",
    "SGLANG_PREFILL_DELAYER_MAX_DELAY_PASSES",
    "SGLANG_PREFILL_DELAYER_TOKEN_USAGE_LOW_WATERMARK",
)
"""SGLang's environment variables that override the prefill delayer's engine arguments."""


def environment_overrides(environ: Mapping[str, str] = os.environ) -> list[str]:
    """``NAME=value`` of each set variable of ``DELAYER_ENVIRONMENT``: SGLang takes them over
    what adapters.yaml asks (``engine.sglang.prefill_delay_passes``)."""
    return [f"{name}={environ[name]}" for name in DELAYER_ENVIRONMENT if environ.get(name)]


def engine_kwargs(
    settings: SGLangSettings, base_dir: str, adapters: dict[str, str], dtype: str = "auto"
) -> dict:
    """Registry settings → ``sglang.Engine`` keyword arguments."""
    kwargs = {
        "model_path": base_dir,
        "dtype": dtype,
        "enable_lora": True,
        "lora_paths": [
            {"lora_name": n, "lora_path": p, "pinned": False} for n, p in adapters.items()
        ],
        "max_loras_per_batch": settings.max_loras_per_batch,
        "lora_backend": settings.lora_backend,
        "attention_backend": settings.attention_backend,
        "sampling_backend": settings.sampling_backend,
        "mem_fraction_static": settings.mem_fraction_static,
        "disable_cuda_graph": not settings.cuda_graph,
        "stream_interval": 1 if settings.stream_interval == "auto" else settings.stream_interval,
        "incremental_streaming_output": True,
        "grammar_backend": "llguidance",
        "tp_size": settings.tp_size,
        "dp_size": settings.dp_size,
        "log_level": "warning",
    }
    optional = {
        "max_loaded_loras": settings.max_loaded_loras,
        "max_lora_rank": settings.max_lora_rank,
        "lora_target_modules": settings.lora_target_modules,
        "chunked_prefill_size": settings.chunked_prefill_size,
        "max_running_requests": settings.max_running_requests,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if settings.prefill_delay is not None:
        kwargs.update(
            enable_prefill_delayer=True, prefill_delayer_max_delay_passes=settings.prefill_delay
        )
    if not adapters and not (settings.max_lora_rank and settings.lora_target_modules):
        kwargs.update(max_lora_rank=64, lora_target_modules=["all"])
    if settings.max_loaded_loras is not None and settings.max_loaded_loras < len(adapters):
        kwargs["lora_paths"] = kwargs["lora_paths"][: settings.max_loaded_loras]
    kwargs.update(sglang_radix.engine_kwargs_for(settings.radix_evict_fraction, settings.extra))
    kwargs.update(settings.extra)
    return kwargs


def ready_our_parts(settings: SGLangSettings, kwargs: dict) -> list[tuple[bool, str]]:
    """Ready SGLang's processes for this product's parts (the plugin's hooks, tuned kernels)
    before ``sglang.Engine(**kwargs)`` starts them: each part's (a warning?, what serves)."""
    kernels = use_tuned_kernels(settings.lora_kernel_configs)
    return [
        sglang_radix.ready(kwargs, settings.radix_evict_fraction, settings.extra),
        sglang_lora_batch.ready(kwargs, settings.fast_lora_batch),
        sglang_prefill_slots.ready(kwargs, settings.prefill_delay_min_slots),
        kernels_note(settings.lora_kernel_configs, kernels),
    ]


def sampling_params(
    params: SamplingParams, stop_ids: set[int] | None = None, stream_interval: int | None = None
) -> dict:
    """Our ``SamplingParams`` → SGLang's sampling dict; ``stop_ids`` end the answer too."""
    out = {
        "max_new_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,
    }
    optional = {
        "stop": list(params.stop) or None,
        "stop_token_ids": sorted(stop_ids) if stop_ids and not params.ignore_eos else None,
        "sampling_seed": params.seed,
        "presence_penalty": params.presence_penalty or None,
        "frequency_penalty": params.frequency_penalty or None,
        "logit_bias": {str(k): v for k, v in params.logit_bias.items()} or None,
        "stream_interval": stream_interval,
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    extensions = params.extensions()
    if "min_tokens" in extensions:
        extensions["min_new_tokens"] = extensions.pop("min_tokens")  # SGLang's name
    out.update(extensions)
    if params.constraint is not None:
        out.update(params.constraint.sglang_params())
    return out


SGLANG_RESERVED_TOKENS = 2
"""SGLang 0.5.17's scheduler caps an answer at ``context - prompt - 2`` tokens
(``init_req_max_new_tokens``: ``max_req_len - input_len - 1``, ``max_req_len`` the context
less one where the KV pool holds a whole context): a default ``max_tokens`` is fitted to that,
not past it (an explicit one SGLang cuts by up to 2 tokens, as vLLM would not)."""
SGLANG_PROMPT_MARGIN = 7
"""SGLang 0.5.17's scheduler aborts a prompt of ``max_req_len - 5`` tokens or more
(``validate_input_length``), i.e. the context less 6: the longest prompt is the context less 7,
refused here as a 400 before SGLang answers it with an abort."""

CUT_GRACE = 1.0
"""Seconds an unload waits after a stream of the adapter was cut. SGLang 0.5.17 processes the
abort and the unload from one queue, and unloading an adapter whose aborted request is still in
the running batch kills its scheduler (``mem_pool.load_lora_weight_to_buffer``: ``assert
lora_adapter is not None``; seen on the H200, an unload right after a cut stream)."""


async def refusals_as_400(generating: Awaitable[AsyncIterator[dict]]) -> AsyncIterator[dict]:
    """SGLang's output stream, with its own checks of a request (a ``ValueError`` from its
    sampling-parameter validation, raised when the stream starts) as a 400; errors of the code
    reading the stream are not its refusals and pass through."""
    try:
        outputs = aiter(await generating)
        first = await anext(outputs, None)
    except ValueError as err:
        raise InvalidRequestError(f"SGLang refused the request: {err}") from err
    if first is None:
        return
    yield first
    async for out in outputs:
        yield out


def grace_left(cut_at: float | None, now: float, grace: float = CUT_GRACE) -> float:
    """How long an unload still waits after the adapter's last cut stream."""
    return 0.0 if cut_at is None else max(0.0, grace - (now - cut_at))


def adaptive_interval(running: int) -> int:
    """Tokens per streamed chunk when many streams share the event loop: 1 (token by token) up to
    64 running requests, then one more per 64, at most 8. The first token is always sent at once
    (SGLang emits token 1, 1 + N, 1 + 2N, ...), so TTFT does not change."""
    return max(1, min(8, running // 64))


def finish_reason(meta: dict) -> str | None:
    """SGLang's ``meta_info.finish_reason`` (a dict or None) → "stop" | "length" | "abort"."""
    reason = meta.get("finish_reason")
    if reason is None:
        return None
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    return {"stop": "stop", "length": "length"}.get(kind, "abort")


def matched_token(meta: dict) -> int | None:
    """The stop token a request ended on (SGLang's ``finish_reason.matched`` when it is an id; a
    stop string's is text)."""
    reason = meta.get("finish_reason")
    matched = reason.get("matched") if isinstance(reason, dict) else None
    return matched if isinstance(matched, int) else None


class DeltaTracker:
    """SGLang's incremental streaming outputs (``incremental_streaming_output``): each holds the
    new text, token ids and, with logprobs, their log-probabilities; this keeps the totals."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []

    def update(self, out: dict) -> tuple[str, list[int]]:
        new_ids = list(out.get("output_ids") or [])
        self.ids.extend(new_ids)
        return out.get("text") or "", new_ids

    def logprobs(self, meta: dict, top: int) -> list[TokenLogprob]:
        """This output's tokens with their log-probabilities (``return_logprob`` requests)."""
        chosen = meta.get("output_token_logprobs") or []
        tops = meta.get("output_top_logprobs") or [[] for _ in chosen]
        return [
            TokenLogprob(
                int(token),
                self.text_of(int(token)),
                float(logprob),
                [(int(t), self.text_of(int(t)), float(lp)) for lp, t, *_ in (alternatives or [])][
                    :top
                ],
            )
            for (logprob, token, *_), alternatives in zip(chosen, tops)
        ]

    def text_of(self, token: int) -> str:
        return token_text(self.tokenizer, token) if self.tokenizer is not None else ""


def check_event_loop(bound, running) -> None:
    """SGLang's TokenizerManager answers requests from the event loop of the first one; a
    request from another loop (a second ``asyncio.run``) would wait forever."""
    if bound is not None and bound is not running:
        raise EngineError(
            "the SGLang engine is bound to the event loop of its first request "
            f"({'closed' if bound.is_closed() else 'still open'}); drive it from one event loop "
            "(one asyncio.run for the whole program)"
        )


class PendingAdapters:
    """Adapters registered beyond ``max_loaded_loras``, loaded once from the serving event loop.

    SGLang starts with at most ``max_loaded_loras`` of them; the rest are loaded through its
    async API at the first request (SGLang then evicts the least recently used to host memory
    limits and reloads them from disk on demand). Loading them in ``__init__`` would run on
    ``sglang.Engine``'s own loop, which the serving loop never answers (or, inside a running
    loop, cannot run at all).
    """

    def __init__(self, adapters: dict[str, str]):
        self.adapters = dict(adapters)
        self.task: asyncio.Task | None = None

    async def ensure(self, load) -> None:
        """``await load(name, path)`` for each, once, however many requests arrive together."""
        if not self.adapters:
            return
        if self.task is None:
            self.task = asyncio.ensure_future(self._load_all(load))
        await asyncio.shield(self.task)

    async def _load_all(self, load) -> None:
        for name, path in list(self.adapters.items()):
            await load(name, path)
            del self.adapters[name]


def reroute(dispatcher, original, wrapped) -> None:
    """Point SGLang's TypeBasedDispatcher (an ordered type → method dict) at ``wrapped``."""
    routes = getattr(dispatcher, "_mapping", {})
    for kind, fn in routes.items():
        if fn == original:
            routes[kind] = wrapped
    getattr(dispatcher, "_mro_cache", {}).clear()


class DroppedRequestRelease:
    """Work around sglang#34205: a dropped LoRA request keeps its adapter busy forever.

    SGLang counts the requests using each adapter and unloads one (``unload_adapter``, or the
    LRU eviction of ``max_loaded_loras``) only when its count is zero. A request's count is given
    back only when its final output arrives; a stream closed early (client gone, a cut) or one
    aborted while queued has its state removed first, so it never is, and the unload waits
    forever while holding the lock every later load needs. This wraps the two methods that
    remove such states, releasing each removed request's adapter once; it then clears the
    request's ``lora_path``, which SGLang's 503/500 abort path checks before releasing too.
    """

    DROPPING = ("_handle_abort_req", "_discard_pending_req_states")

    def __init__(self, manager):
        self.manager = manager
        self.tasks: set[asyncio.Task] = set()

    def install(self) -> bool:
        if not all(hasattr(self.manager, n) for n in (*self.DROPPING, "rid_to_state")):
            log.warning("unknown SGLang TokenizerManager: adapters of dropped requests stay busy")
            return False
        dispatcher = getattr(self.manager, "_result_dispatcher", None)
        for name in self.DROPPING:
            original = getattr(self.manager, name)
            wrapped = self.wrap(original)
            setattr(self.manager, name, wrapped)
            # the output loop calls _handle_abort_req through a type → method table built at start
            reroute(dispatcher, original, wrapped)
        return True

    def wrap(self, drop):
        def dropping(*args, **kwargs):
            before = dict(self.manager.rid_to_state)
            children = set(getattr(self.manager, "child_rid_to_logical_rid", ()))
            try:
                return drop(*args, **kwargs)
            finally:
                for rid, state in before.items():
                    if rid not in children and self.manager.rid_to_state.get(rid) is not state:
                        self.release(state.obj)

        return dropping

    def release(self, request) -> None:
        lora_id = getattr(request, "lora_id", None)
        if lora_id is None or not getattr(request, "lora_path", None):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a generator finalised after the loop stopped: nothing to serve
            return
        request.lora_path = None
        task = loop.create_task(self.manager.lora_registry.release(lora_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def abort_error(meta: dict) -> EngineError:
    reason = meta.get("finish_reason") or {}
    message = reason.get("message") if isinstance(reason, dict) else None
    return EngineError(f"SGLang aborted the request: {message or reason}")


class SGLangEngine(Tokenizes, Engine):
    backend = "sglang"
    reserved_tokens = SGLANG_RESERVED_TOKENS

    @property
    def longest_prompt(self) -> int:
        return self.context - SGLANG_PROMPT_MARGIN

    def __init__(
        self,
        base_dir: str,
        base_model_id: str,
        adapters: dict[str, str] | None = None,
        settings: SGLangSettings | None = None,
        dtype: str = "auto",
        chat_template: bool = True,
    ):
        import sglang
        import torch
        from transformers import AutoConfig, AutoTokenizer

        if dtype == "float32":
            raise EngineError(UNSUPPORTED_FLOAT32)
        self.settings = settings or SGLangSettings()
        self.base_dir = base_dir
        self.base_model_id = base_model_id
        self.chat_template = chat_template
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        config = AutoConfig.from_pretrained(base_dir)
        self.context = int(getattr(config, "max_position_embeddings", 2048))
        adapters = dict(adapters or {})
        self.names = set(adapters)
        self.changing: set[str] = set()
        """Names being loaded or unloaded: a second load of one is a conflict, not SGLang's."""
        self.adapter_paths = dict(adapters)
        kwargs = engine_kwargs(self.settings, base_dir, adapters, dtype)
        try:
            said = ready_our_parts(self.settings, kwargs)
        except ValueError as error:
            raise EngineError(str(error)) from None
        for warn, note in said:
            (log.warning if warn else log.info)("%s", note)
        self.start_notes = [note for _, note in said]
        """What serves in SGLang's place or beside it (tree, indices, delayer, kernels)."""
        if overrides := environment_overrides():
            log.warning(
                "%s: SGLang takes these over engine.sglang.prefill_delay_passes (%s) in the "
                "registry; unset them to serve with the registry's",
                ", ".join(overrides), self.settings.prefill_delay_passes,
            )  # fmt: skip
        log.info(
            "starting sglang.Engine with %s", {k: v for k, v in kwargs.items() if k != "lora_paths"}
        )
        self.engine = sglang.Engine(**kwargs)
        DroppedRequestRelease(self.engine.tokenizer_manager).install()
        self.pending = PendingAdapters(dict(list(adapters.items())[len(kwargs["lora_paths"]) :]))
        self.running = 0
        self.adaptive = self.settings.stream_interval == "auto"
        self.aborted: dict[str, RequestEndedError] = {}
        self.cut_at: dict[str, float] = {}
        """When each adapter's last stream was cut (``unload_adapter`` waits out ``CUT_GRACE``)."""
        self.streams_on: collections.Counter[str] = collections.Counter()
        """Our streams per adapter, admitted or being admitted (``unload_adapter`` waits them)."""
        self.prompt_tokenizer = PromptTokenizer(
            self.tokenizer, base_dir, chat_template, self.context
        )
        self.device = torch.cuda.get_device_name(0)

    def adapters(self) -> list[str]:
        return sorted(self.names)

    def adapter_slots(self) -> int:
        return self.settings.max_loras_per_batch

    async def load_into_sglang(self, name: str, path: str) -> None:
        result = await self.engine.async_load_lora_adapter(name, str(path))
        if not getattr(result, "success", True):
            raise AdapterLoadError(f"SGLang could not load '{name}': {result.error_message}")

    async def load_adapter(self, name: str, path: str, max_rank: int | None = None) -> None:
        where = Path(path)
        check_loadable(
            name, where, self.names, self.base_dir, self.backend, max_rank, self.changing
        )
        with holding(self.changing, name):
            await self.pending.ensure(self.load_into_sglang)
            await self.load_into_sglang(name, path)
        self.names.add(name)
        self.adapter_paths[name] = str(path)

    async def unload_adapter(self, name: str) -> None:
        self.check_adapter(name)
        self.names.discard(name)
        self.adapter_paths.pop(name, None)
        with holding(self.changing, name):
            while self.streams_on[name]:  # the API ends them at its unload deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(grace_left(self.cut_at.get(name), time.monotonic()))
            result = await self.engine.async_unload_lora_adapter(name)
        if not getattr(result, "success", True):
            raise AdapterLoadError(f"SGLang could not unload '{name}': {result.error_message}")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        request.validate()
        self.check_adapter(request.adapter)
        self.streams_on[request.adapter] += 1
        try:
            async with contextlib.aclosing(self.sglang_chunks(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.streams_on[request.adapter] -= 1
            self.aborted.pop(request.request_id, None)

    async def admit(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids, once the request is checked; checked again after the awaits
        (an unload or an abort may have come meanwhile)."""
        ids = await self.prompt_tokenizer(request)
        fit_to_context(len(ids), request, self.context, self.reserved_tokens, self.longest_prompt)
        params = request.params
        if params.constraint is not None and (problem := grammar_problem(params.constraint)):
            raise InvalidRequestError(f"response_format: {problem}", "response_format")
        bound = getattr(self.engine.tokenizer_manager, "event_loop", None)
        check_event_loop(bound, asyncio.get_running_loop())
        await self.pending.ensure(self.load_into_sglang)
        if (ended := self.aborted.pop(request.request_id, None)) is not None:
            raise ended
        self.check_adapter(request.adapter)
        return ids

    async def sglang_chunks(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        ids = await self.admit(request)
        params = request.params
        interval = adaptive_interval(self.running) if self.adaptive else None
        logprobs = params.logprobs is not None
        clock, tracker, finished = RequestClock(), DeltaTracker(self.tokenizer), False
        self.running += 1
        try:
            outputs = refusals_as_400(
                self.engine.async_generate(
                    input_ids=ids,
                    sampling_params=sampling_params(params, self.stop_ids, interval),
                    lora_path=request.adapter,
                    stream=True,
                    rid=request.request_id,
                    return_logprob=logprobs,
                    top_logprobs_num=params.logprobs or None,
                )
            )
            clock.start()  # handed to SGLang's scheduler; its queue is not visible from here
            async for out in outputs:
                if (ended := self.aborted.pop(request.request_id, None)) is not None:
                    raise ended  # an abort that came before SGLang knew the request id
                meta = out.get("meta_info", {})
                text, new_ids = tracker.update(out)
                if new_ids:
                    clock.token()
                entries = tracker.logprobs(meta, params.logprobs) if logprobs else None
                reason = finish_reason(meta)
                if reason == "abort":
                    raise self.aborted.pop(request.request_id, None) or abort_error(meta)
                if reason is None:
                    if text or new_ids:
                        yield Chunk(text, new_ids, logprobs=entries)
                    continue
                finished = True
                if entries and entries[-1].token_id == matched_token(meta):
                    entries = entries[:-1]  # the end-of-turn token is not in the text: no entry
                usage = Usage(meta.get("prompt_tokens", len(ids)), len(tracker.ids))
                timings = clock.timings(len(tracker.ids))
                yield Chunk(text, new_ids, reason, usage, timings, entries)
                return
        finally:
            self.running -= 1
            if not finished:
                self.engine.tokenizer_manager.abort_request(request.request_id)
                if request.adapter is not None:
                    self.cut_at[request.adapter] = time.monotonic()

    def abort(self, request_id: str, why: str) -> None:
        """Ends the request at its next output (SGLang drops an abort for an id it has not
        registered yet, so the stream checks ``aborted`` too)."""
        self.aborted[request_id] = RequestEndedError(why or "the request was ended")
        self.engine.tokenizer_manager.abort_request(request_id)

    def stats(self) -> dict:
        return {
            "running": self.running,
            "queued": 0,
            "adapters_loaded": len(self.names),
            "sglang_open_requests": len(self.engine.tokenizer_manager.rid_to_state),
            "kv_pool_tokens": self.kv_pool_tokens(),
        }

    def kv_pool_tokens(self) -> int | None:
        """Tokens SGLang's KV pool holds (``max_total_num_tokens`` of its start-up handshake:
        with ``dp_size`` > 1 one replica's), or None where this SGLang keeps it elsewhere."""
        started = getattr(self.engine, "_scheduler_init_result", None)
        infos = getattr(started, "scheduler_infos", None) or [{}]
        return infos[0].get("max_total_num_tokens")

    async def shutdown(self) -> None:
        self.prompt_tokenizer.close()
        self.engine.shutdown()
