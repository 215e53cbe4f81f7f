"""adapters.yaml: the base model, the engine settings and every adapter, validated.

    python -m engine --list --config adapters.yaml     # validate a registry and list its adapters

Errors name the entry and the field, e.g. ``adapters[1] 'spam' → path: no such directory``.
Relative paths resolve against the folder of the YAML file.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .constraints import ResponseFormat
from .interface import stop_problem

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)
"""A browser's ``Origin``: scheme, host (or a bracketed IPv6 address), optional port."""
BASE_MODEL_ALIAS = "base"
"""The one name of the base model outside the engine (API ``model``, metric label, the app's
choice); inside the engine the base is ``adapter=None``."""
FANOUT = "fanout"
"""The API's ``model`` for one prompt sent to several models at once (``models``): no adapter
may take the name."""
RESERVED_NAMES = {BASE_MODEL_ALIAS: "the base model", FANOUT: "fan-out requests (models: [...])"}
"""Names no adapter may take (adapters.yaml or a hot-load), and what each is for."""


class RegistryError(ValueError):
    """adapters.yaml is invalid; the message lists every problem, one per line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class BaseSpec(Strict):
    model: str = "smollm2"
    """``smollm2`` (the packaged SmolLM2-135M-Instruct GGUF, converted once to a cached bf16
    safetensors dir), a local Hugging Face-format directory, or a hub id."""
    name: str | None = None
    """Model id shown by the API (``/v1/models``); defaults to the model's folder or hub name."""
    chat_template: bool = True
    """Wrap prompts from the chat endpoint and the app in the tokenizer's chat template."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype. ``auto``: float32 on CPU (fastest there and batch-exact), bfloat16 on GPU."""
    generation: GenerationDefaults = Field(default_factory=lambda: GenerationDefaults())
    """The base model's sampling defaults (a request's own values win), also those of an adapter
    with no entry here (hot-loaded or merged): as vLLM takes a model's ``generation_config``."""


SGLANG_KWARGS_OF_FIELDS = frozenset(
    """model_path dtype enable_lora lora_paths max_loras_per_batch max_loaded_loras lora_backend
    max_lora_rank lora_target_modules attention_backend sampling_backend mem_fraction_static
    disable_cuda_graph chunked_prefill_size max_running_requests stream_interval
    incremental_streaming_output grammar_backend tp_size dp_size enable_prefill_delayer
    prefill_delayer_max_delay_passes""".split()
)
"""``sglang.Engine`` keyword arguments the SGLang backend sets (``engine_kwargs``)."""


DEFAULT_PREFILL_DELAY_PASSES = 8
"""``prefill_delay_passes: auto`` where SGLang's prefill delayer works as measured."""


class SGLangSettings(Strict):
    max_loras_per_batch: int = Field(8, ge=1)
    """Distinct adapters one running batch may hold (the base model counts as one)."""
    max_loaded_loras: int | None = Field(None, ge=1)
    """Adapters kept in host memory at once (LRU eviction); ``None`` = all; must be
    >= max_loras_per_batch."""
    lora_backend: Literal["csgmv", "triton", "torch_native"] = "csgmv"
    """Multi-LoRA kernel backend."""
    lora_kernel_configs: str | None = Field("auto", min_length=1)
    """Block sizes for csgmv's kernels, tuned once per GPU and base model by ``python -m
    engine.lora_kernels``: that folder (a relative one: beside this file); ``auto``:
    ``$LORALAND_CACHE/lora-kernels`` once the tuner wrote there, else SGLang's own; ``None``:
    SGLang's own (it ships rank 64 only). A variable ``SGLANG_LORA_CONFIG_DIR`` in the
    environment wins. H200, 7B, rank 8: the kernels at 0.31–0.71× their time, the engine faster
    in every figure of 3 alternated pairs
    (``results/serving/h200-7b-lora-kernels-tuned``)."""
    max_lora_rank: int | None = Field(None, ge=1)
    """Largest rank a hot-loaded adapter may have; ``None`` = inferred from the adapters."""
    lora_target_modules: list[str] | None = None
    """Modules hot-loaded adapters may target; ``None`` = inferred from the adapters."""
    attention_backend: str = "triton"
    """SGLang attention kernels; the offline bundle has no FA3, so triton."""
    sampling_backend: str = "pytorch"
    """SGLang sampling kernels."""
    mem_fraction_static: float = Field(0.8, gt=0.0, lt=1.0)
    """Fraction of GPU memory for weights + KV cache."""
    cuda_graph: bool = True
    """Capture CUDA graphs for decode (slower start, faster decode)."""
    chunked_prefill_size: int | None = None
    """Prefill chunk size in tokens; ``None`` = SGLang's default."""
    radix_evict_fraction: float | None = Field(0.01, gt=0.0, lt=1.0)
    """Each eviction from SGLang's prefix tree frees at least this fraction of the KV pool, least
    recently used first (``engine/backends/sglang_radix.py``): SGLang builds a heap of every
    cached request per eviction and, once the pool is full, evicts at every decode step. The
    tree then holds up to this much less. H200, 7B, 6,000 cached requests: the tree's work per
    step 4.9 ms → 45 µs; with FP8 weights (where the scheduler's thread bounds the step) engine
    against engine 1.12–1.20× tok/s through HTTP base and direct with 128 adapters, 0.96–1.05×
    through HTTP with adapters (``results/serving/h200-7b-batched-radix-eviction``). ``None``:
    SGLang's own eviction, only the tokens asked for. Not applied where ``extra`` picks another
    tree (``disable_radix_cache``, ``radix_cache_backend``, ``enable_hierarchical_cache``,
    ``enable_int8_mamba_checkpoint``), where ``SGLANG_PLUGINS`` leaves out ``loraland``, or
    where the model needs a hybrid tree; the start log says which tree serves."""
    fast_lora_batch: bool = True
    """Build each batch's LoRA indices for csgmv's kernels (which tokens use which adapter, in
    segments) with a few vectorised tensor calls instead of SGLang's loop over the batch's
    adapters, and copy the lm_head's to the GPU without waiting for it
    (``engine/backends/sglang_lora_batch.py``): the same tensors, less of the scheduler's one
    thread (with FP8 weights the indices took 12–14 % of it at 256 streams × 128 adapters).
    H200: a decode pass of 256 requests over 128 adapters 1,285 → 416 µs of that thread; 7B
    FP8 engines with and without it level, 0.95–1.02× tok/s
    (``results/serving/h200-7b-lora-batch-indices``). ``False``: SGLang's own. Only for
    ``lora_backend: csgmv``; not applied where ``SGLANG_PLUGINS`` leaves out ``loraland`` or
    where the SGLang installed defines csgmv's methods otherwise (the start log says which)."""
    max_running_requests: int | None = Field(256, ge=1)
    """Requests decoded together at most (per replica); the rest wait for a slot before their
    prefill, and SGLang lowers it further to what its KV pool holds. 256: SGLang's decode CUDA
    graphs reach 256 on an H100/H200, and past 256 running the 7B decode step on an H200 slowed
    4x: under 85 Poisson arrivals a second SGLang's own limit outran them at 12 of 12 points,
    256 carried 11 of 12 (``results/serving/h200-7b-open-loop-defaults-vs-cap``). ``None``:
    SGLang's own limit, from the KV pool (thousands on an H200)."""
    prefill_delay_passes: int | Literal["auto"] | None = "auto"
    """Near ``max_running_requests`` (fewer slots free than the largest prefill of the last few
    hundred passes took), new requests wait fewer than this many forward passes, so that their
    prefills run together in one step instead of a prefill step between nearly every two decode
    steps (SGLang's prefill delayer). At full load each prefill waits the whole time; away from
    the cap none does: one stream (the app) starts at once, and with ``max_running_requests:
    null`` it almost never acts. ``auto``: 8 where it works as measured (one data-parallel
    replica, SGLang's overlap scheduler on: no ``disable_overlap_schedule``, ``pp_size`` > 1,
    ``enable_pdmux`` or ``dllm_algorithm`` in ``extra``), else off; a number there is refused.
    H200, 7B, 256 streams, 8 against off over 3 alternated pairs: output tok/s 1.14–1.17× with
    128 adapters (HTTP: 11.8k), 1.18–1.20× base; whole answers 0.85–0.88× the time; the first
    token's median 49–95 ms later, at ~130 ms (``results/serving/h200-7b-prefill-delayer``).
    ``None``: off, each request prefilled at the first pass with room (SGLang's default). A base
    model SGLang runs without its overlap scheduler (hybrid Mamba models) needs ``None``."""

    prefill_delay_min_slots: int | None = Field(None, ge=1)
    """Near ``max_running_requests`` the prefill delayer waits for at least this many free slots
    (or ``prefill_delay_passes`` passes), however requests arrive. SGLang's own rule waits only
    while fewer slots are free than the largest recent prefill took; where requests arrive
    spread out, as HTTP clients send them, that stays small and the delayer waits little
    (``engine/backends/sglang_prefill_slots.py``). H200, 7B, FP8, 256 streams, base and 128
    adapters: a prefill's launches took 15–16 % of SGLang's scheduler thread through HTTP, 7 %
    engine-direct (``results/serving/h200-7b-scheduler-http-vs-direct``). At 32 there: 128
    adapters through HTTP 15.4k against 15.1k tok/s without (level within the engines' spread),
    the first token's p50 141 against 83 ms (``results/serving/h200-7b-prefill-min-slots``): off
    by default. SGLang's own ``min_free_slots_delay`` caps its
    number at 4 and does not bound the wait in passes. ``None``: SGLang's rule alone. Needs the
    delayer on (``prefill_delay_passes`` not off), at most half of ``max_running_requests``
    (per DP rank with DP attention; where SGLang lowers its cap, half of that is used), and not
    SGLang's queue trigger (``prefill_delayer_queue_min_ratio`` in ``extra``); not applied where
    ``SGLANG_PLUGINS`` leaves out ``loraland`` (the start notes say)."""

    @field_validator("prefill_delay_passes")
    @classmethod
    def delay_of_at_least_two(cls, value):
        if isinstance(value, int) and value < 2:
            raise ValueError(
                "must be >= 2 (SGLang delays fewer than this many passes), 'auto' or null"
            )
        return value

    stream_interval: int | Literal["auto"] = "auto"
    """Stream a chunk every N tokens: N times fewer outputs for the one event loop that runs the
    API and SGLang's tokenizer manager, at the price of coarser streaming. ``auto``: token by
    token up to 64 running requests, then one token more per chunk for each further 64 (at most
    8), decided per request as it starts; the first token always goes out at once."""

    @field_validator("stream_interval")
    @classmethod
    def positive_interval(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return value

    tp_size: int = Field(1, ge=1)
    """Tensor-parallel GPUs."""
    dp_size: int = Field(1, ge=1)
    """Data-parallel replicas."""
    extra: dict = Field(default_factory=dict)
    """Any further ``sglang.Engine`` keyword arguments, passed through unchanged; not those the
    fields above set (``SGLANG_KWARGS_OF_FIELDS``)."""

    @field_validator("extra")
    @classmethod
    def extra_adds_only(cls, value: dict) -> dict:
        taken = sorted(set(value) & SGLANG_KWARGS_OF_FIELDS)
        if taken:
            raise ValueError(f"{', '.join(taken)}: set by a field of its own, not through extra")
        return value

    def delayer_conflicts(self) -> list[str]:
        """Settings under which SGLang's prefill delayer does not work as measured."""
        extra, found = self.extra, []
        if self.dp_size > 1 and not extra.get("enable_dp_attention"):
            found.append(f"dp_size {self.dp_size} (without enable_dp_attention it takes each "
                         "replica's cap for max_running_requests ÷ dp_size)")  # fmt: skip
        pp_size = extra.get("pp_size")
        off = [key for key in ("disable_overlap_schedule", "enable_pdmux", "dllm_algorithm")
               if extra.get(key)] + (["pp_size > 1"] if isinstance(pp_size, int) and pp_size > 1
                                     else [])  # fmt: skip
        if off:
            found.append(f"{', '.join(off)} in extra (it needs SGLang's overlap scheduler)")
        return found

    @property
    def prefill_delay(self) -> int | None:
        """``prefill_delay_passes`` resolved: the passes the SGLang backend asks for, or None."""
        if self.prefill_delay_passes == "auto":
            return None if self.delayer_conflicts() else DEFAULT_PREFILL_DELAY_PASSES
        return self.prefill_delay_passes

    @model_validator(mode="after")
    def delay_where_it_works(self) -> SGLangSettings:
        if isinstance(self.prefill_delay_passes, int) and (found := self.delayer_conflicts()):
            raise ValueError(
                f"prefill_delay_passes {self.prefill_delay_passes} does not work with "
                f"{'; '.join(found)}: set it to auto (off here) or null"
            )
        return self

    @model_validator(mode="after")
    def min_slots_with_the_delayer(self) -> SGLangSettings:
        slots = self.prefill_delay_min_slots
        if slots is None:
            return self
        if self.prefill_delay is None:
            why = (
                "prefill_delay_passes: null"
                if self.prefill_delay_passes is None
                else "; ".join(self.delayer_conflicts())
            )
            raise ValueError(
                f"prefill_delay_min_slots {slots} needs SGLang's prefill delayer, off here "
                f"({why}): set prefill_delay_min_slots to null"
            )
        if self.extra.get("prefill_delayer_queue_min_ratio") is not None:
            raise ValueError(
                "prefill_delay_min_slots with extra's prefill_delayer_queue_min_ratio: SGLang's "
                "queue trigger would wait for that many requests at any load; set one of them"
            )
        if (cap := self.slots_per_scheduler) is not None and slots > cap // 2:
            counted = (
                f"{self.max_running_requests} ÷ dp_size {self.dp_size} = {cap}"
                if cap != self.max_running_requests
                else str(cap)
            )
            raise ValueError(
                f"prefill_delay_min_slots ({slots}) must be at most half of each scheduler's "
                f"max_running_requests ({counted}): the delayer waits only near the cap"
            )
        return self

    @property
    def slots_per_scheduler(self) -> int | None:
        """``max_running_requests`` as each SGLang scheduler counts it (DP attention splits
        it across the ``dp_size`` ranks); None: SGLang's own, from the KV pool."""
        cap = self.max_running_requests
        if cap is not None and self.extra.get("enable_dp_attention"):
            return cap // self.dp_size
        return cap

    @model_validator(mode="after")
    def loaded_holds_a_batch(self) -> SGLangSettings:
        if self.max_loaded_loras is not None and self.max_loaded_loras < self.max_loras_per_batch:
            raise ValueError(
                f"max_loaded_loras ({self.max_loaded_loras}) must be >= max_loras_per_batch "
                f"({self.max_loras_per_batch}): a batch's adapters must all be loaded"
            )
        return self


class HFSettings(Strict):
    max_batch_size: int = Field(16, ge=1)
    """Rows (requests) decoded together; adapters and base rows mix freely in one batch. One
    client request's rows (``n`` choices, fan-out models) take at most three quarters of them,
    rounded down (at least one): its other rows wait for its earlier ones, so with two rows or
    more one request alone never holds them all."""
    threads: int | None = Field(1, ge=1)
    """torch CPU threads. 1: with 2 threads on a 2-core machine that anything else shares,
    decode slows several-fold (``results/cpu/serving-options``); ``None`` = torch's default."""
    lora: Literal["batched", "peft"] = "batched"
    """``batched``: every row's LoRA in one gathered op per layer
    (``engine/backends/lora_batched.py``); ``peft``: peft's ``adapter_names``, a loop over the
    batch's adapters. On a GPU the CPU default always uses peft."""
    prefill_tokens: int = Field(512, ge=16)
    """Prompt tokens one step prefills at most (rows × the longest prompt among them): waiting
    requests join together while they fit, and a longer prompt is prefilled this many tokens a
    step, between the running rows' decode steps (short prompts still join beside its chunk), so
    one long prompt slows the others' tokens instead of stopping them (a hostile-input pass sent
    16 prompts of 7,000 tokens in one request: prefilled in one step, they stopped every stream
    for minutes). Its later chunks are smaller, as attention over the context so far grows, so
    each step costs about what the first did. Not benchmarked: 512 is a bound on a step, not a
    tuned optimum."""
    base_weights: Literal["fp16", "fp32", "int8"] = "fp16"
    """The base's Linear weights on the ``batched`` path (activations and the LoRA terms stay
    fp32): ``fp16`` halves the bytes read per decode step and is lossless for a base stored in
    bf16 such as SmolLM2; ``fp32`` is the exact mode (peft's greedy tokens, used by the
    evaluator); ``int8`` is faster still and lossy."""


class ServerSettings(Strict):
    """Limits of the HTTP front end (``python app.py``, ``python -m engine.api``)."""

    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body, on every route (Gradio's upload route too); a larger one is a 413
    before it is read."""
    drain_seconds: float = Field(30.0, ge=0.0)
    """On SIGTERM new requests are refused and running streams may go on this long; those still
    running then end with an error chunk and ``[DONE]``."""
    unload_seconds: float = Field(30.0, ge=0.0)
    """``DELETE /v1/adapters/NAME`` lets the adapter's running streams go on this long, then ends
    them with an error chunk; new requests for it are refused at once."""
    max_adapter_rank: int = Field(64, ge=1)
    """Hot-loaded adapters of a higher LoRA rank are refused (422)."""
    cors_origins: list[str] = []
    """Origins (``scheme://host[:port]``, or ``"*"`` for any) whose web pages may call the API
    from a browser and read its answers (CORS: preflights answered, ``Access-Control-Allow-*``
    headers, no cookies). Empty by default: a page from elsewhere cannot read the answers of a
    server on your machine (vLLM and SGLang allow every origin by default)."""
    open_metrics: bool = False
    """With an API key set (``LORALAND_API_KEY``), ``/metrics`` needs it too, as ``/v1`` does
    (Prometheus sends it with ``authorization: {credentials: <key>}``): its series name every
    adapter. True leaves ``/metrics`` open for a scraper that cannot send a key. Without a key
    everything is open anyway. ``/health`` stays open, but without the key it answers only
    ``{"ok": ...}``."""
    freeze_heap: bool = True
    """Once the engine and the app are built, move every object alive (the model's libraries:
    hundreds of thousands) out of the garbage collector's sight (``gc.freeze``), so a full
    collection — which stops every stream — walks only what requests allocate. The pauses are in
    ``/metrics`` (``loraland_gc_pause_*``)."""

    @field_validator("cors_origins")
    @classmethod
    def origins_as_browsers_send_them(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin: scheme://host[:port], or '*'")
            default_port = {"http": ":80", "https": ":443"}.get(origin.partition(":")[0])
            if origin != origin.lower() or (default_port and origin.endswith(default_port)):
                raise ValueError(
                    f"{origin!r} would never match: browsers send an origin in lower case and "
                    "without its scheme's default port"
                )
        return origins


class ClusterSettings(Strict):
    """Several engine replicas behind sglang-router (``python -m engine.cluster``)."""

    replicas: int = Field(1, ge=1)
    """Engine replicas, one ``python -m engine.api`` process each, started together; requests
    reach them through sglang-router."""
    gpus_per_replica: int = Field(1, ge=1)
    """GPUs each replica takes (``CUDA_VISIBLE_DEVICES``); ``tp_size`` × ``dp_size`` of the
    SGLang settings must fit in them. Replica *i* gets GPUs *i*·n … *i*·n + n − 1 of
    ``gpus``."""
    gpus: list[int] | None = None
    """The GPUs to share out; ``None`` = 0 … replicas × gpus_per_replica − 1. A GPU listed
    more than once holds that many replicas, which share its memory: each then needs
    ``engine.sglang.extra.max_total_tokens`` (its KV pool, in tokens). On the CPU default no GPU
    is set and every replica runs on the CPU."""
    policy: Literal["adapter_affinity", "round_robin", "cache_aware", "random"] = "adapter_affinity"
    """sglang-router's policy. ``adapter_affinity`` is its ``manual`` policy keyed by the
    ``X-SMG-Routing-Key`` header, which the app and the load test set to the adapter's name:
    one adapter's requests stay on one replica while it is healthy. A request without the
    header goes to a random replica: the base's requests carry none, as every replica serves
    the base alike. The others are sglang-router's policies of that name."""
    hosts: list[str] | None = None
    """Replicas already running elsewhere (``http://host:port`` each, started there with
    ``python -m engine.api``): the router fronts these instead of starting local replicas."""

    @model_validator(mode="after")
    def enough_gpus(self) -> ClusterSettings:
        wanted = self.replicas * self.gpus_per_replica
        if self.gpus is not None and len(self.gpus) < wanted:
            raise ValueError(
                f"{self.replicas} replicas × {self.gpus_per_replica} GPUs need {wanted} GPUs, "
                f"gpus lists {len(self.gpus)}"
            )
        if self.hosts is not None and len(self.hosts) != self.replicas:
            raise ValueError(f"hosts lists {len(self.hosts)} replicas, replicas is {self.replicas}")
        if self.hosts is not None and self.gpus is not None:
            raise ValueError("gpus places local replicas; with hosts each host places its own")
        for index in range(self.replicas):
            if len(set(gpus := self.replica_gpus(index))) < len(gpus):
                raise ValueError(f"replica {index} would get GPU(s) {gpus}: one GPU twice")
        return self

    def shared_gpus(self) -> list[int]:
        """The GPUs that more than one local replica runs on."""
        placed = [g for i in range(self.replicas) for g in self.replica_gpus(i)]
        return sorted({g for g in placed if placed.count(g) > 1})

    def replica_gpus(self, index: int) -> list[int]:
        gpus = self.gpus if self.gpus is not None else range(self.replicas * self.gpus_per_replica)
        n = self.gpus_per_replica
        return list(gpus[index * n : index * n + n])


class EngineSpec(Strict):
    backend: Literal["auto", "sglang", "hf"] = "auto"
    """``auto`` picks SGLang when CUDA and sglang are present, else the CPU default (hf)."""
    sglang: SGLangSettings = Field(default_factory=SGLangSettings)
    """Settings of the SGLang backend."""
    hf: HFSettings = Field(default_factory=HFSettings)
    """Settings of the CPU default backend (transformers + peft)."""
    load_on_demand: bool = False
    """A request naming an adapter that is not loaded but lies under the adapter root
    (``<root>/<name>``) loads it first (fit-checked as a hot-load), however many ask at once;
    a name that exists nowhere is still a 404."""


class GenerationDefaults(Strict):
    """An adapter's sampling defaults: a request's own value wins; a field left out here falls
    back to the server-wide default (``engine.interface.SamplingParams``). The API, the app, the
    CLI and the evaluator resolve them alike (``engine.sampling.resolve``)."""

    max_tokens: int | None = Field(None, ge=1)
    """Default output length for this adapter."""
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """Default temperature; 0 = greedy."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    """Default nucleus-sampling mass."""
    top_k: int | None = Field(None, ge=0)
    """Default top-k; 0 = off."""
    stop: list[str] | None = Field(None, max_length=4)
    """Default stop strings, under a request's rules (``stop_problem``)."""

    @field_validator("stop")
    @classmethod
    def stops_a_request_may_send(cls, stop: list[str] | None) -> list[str] | None:
        if stop and (problem := stop_problem(stop)):
            raise ValueError(problem)
        return stop

    response_format: ResponseFormat | None = None
    """Default structured output, e.g. ``{type: choice, choices: [fresh, rotten]}`` for a
    classifier or a ``json_schema`` for an extractor; a request's ``response_format`` (also
    ``{type: text}``) replaces it."""


BaseSpec.model_rebuild()  # its ``generation`` names GenerationDefaults, defined above


class EvalScore(Strict):
    metric: str
    """Primary metric name (accuracy, exact_match, execution_accuracy, ...)."""
    score: float
    """Fine-tuned score on the held-out test split."""
    base_score: float | None = None
    """Base model's score on the same split."""
    n: int | None = None
    """Number of test examples."""


class AdapterSpec(Strict):
    name: str
    """Unique slug: lower-case letters, digits, ``-`` and ``_``; the API's model id."""
    path: Path
    """Directory with ``adapter_config.json`` and ``adapter_model.safetensors``."""
    task: str = ""
    """Short task name (sentiment, spam, text-to-sql, ...)."""
    category: str = "general"
    """Group shown by the app's category picker."""
    description: str = ""
    """One or two sentences for the adapter card."""
    template: str = "{input}"
    """Prompt template with named ``{fields}``; the app shows one input per field."""
    examples: list[dict[str, str]] = Field(default_factory=list)
    """Example values of the template's fields."""
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    """Default generation parameters."""
    eval: EvalScore | None = None
    """Held-out evaluation score vs the base model, if measured."""
    trained_on: str | None = None
    """The ``base.model`` this adapter was trained on; if set, it must be this file's base."""

    @field_validator("name")
    @classmethod
    def name_is_slug(cls, name: str) -> str:
        if not SLUG.match(name):
            raise ValueError("must be a slug: a-z, 0-9, '-', '_' (max 64 chars)")
        if name in RESERVED_NAMES:
            raise ValueError(f"'{name}' is reserved for {RESERVED_NAMES[name]}")
        return name

    @field_validator("template")
    @classmethod
    def template_parses(cls, template: str) -> str:
        fields = template_fields(template)
        if not fields:
            raise ValueError("needs at least one {field}")
        return template

    def render(self, values: dict[str, str]) -> str:
        missing = [f for f in template_fields(self.template) if f not in values]
        if missing:
            raise KeyError(f"template of '{self.name}' needs fields {missing}")
        return self.template.format(**values)

    def fill(self, text: str) -> str:
        """The template with its one field set to ``text`` (what a user of the adapter types)."""
        fields = template_fields(self.template)
        if len(fields) != 1:
            raise ValueError(
                f"adapter '{self.name}' has a template with fields {fields}: give each by name"
            )
        return self.render({fields[0]: text})


class Registry(Strict):
    base: BaseSpec = Field(default_factory=BaseSpec)
    """The one base model every adapter is trained on."""
    engine: EngineSpec = Field(default_factory=EngineSpec)
    """Backend choice and its settings."""
    server: ServerSettings = Field(default_factory=ServerSettings)
    """Limits of the HTTP API and the app."""
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    """Replicas behind sglang-router (``python -m engine.cluster``); one replica by default."""
    adapters: list[AdapterSpec] = Field(default_factory=list)
    """The adapters served at start."""

    @model_validator(mode="after")
    def replicas_fit_their_gpus(self) -> Registry:
        sglang, cluster = self.engine.sglang, self.cluster
        local = cluster.replicas > 1 and cluster.hosts is None  # remote replicas size themselves
        if local and sglang.tp_size * sglang.dp_size > cluster.gpus_per_replica:
            raise ValueError(
                f"cluster.gpus_per_replica ({cluster.gpus_per_replica}) < engine.sglang tp_size "
                f"× dp_size ({sglang.tp_size * sglang.dp_size}): a replica needs that many GPUs"
            )
        shared = cluster.shared_gpus() if local else []
        if shared and "max_total_tokens" not in sglang.extra:
            raise ValueError(
                f"cluster.gpus places several replicas on GPU {', '.join(map(str, shared))}: set "
                "engine.sglang.extra.max_total_tokens (each replica's KV pool, in tokens), as "
                "SGLang sizes a pool from the memory free when its replica starts, and replicas "
                "started together would get small, uneven pools"
            )
        return self

    def adapter(self, name: str) -> AdapterSpec:
        for spec in self.adapters:
            if spec.name == name:
                return spec
        raise KeyError(name)


def template_digest(template: str) -> str | None:
    """A short fingerprint of a prompt template (None: no template), for telling two apart."""
    return hashlib.sha256(template.encode()).hexdigest()[:16] if template else None


def template_fields(template: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"is not a valid template: {err}") from err
    names = [name for _, name, _, _ in parsed if name is not None]
    if any(not n.isidentifier() for n in names):
        raise ValueError("fields must be named, e.g. {review}")
    return list(dict.fromkeys(names))


def with_overrides(settings: Strict, items: list[str]) -> Strict:
    """A copy of engine settings with ``KEY=JSON`` overrides (the CLIs' ``--set``), validated."""
    values = settings.model_dump()
    fields = sorted(type(settings).model_fields)
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise RegistryError(f"--set {item!r}: want KEY=VALUE with KEY one of {fields}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw  # a bare string, e.g. lora_backend=triton
    try:
        return type(settings).model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = first["loc"][0] if first["loc"] else "the settings together"  # a cross-field rule
        message = first["msg"].removeprefix("Value error, ")
        raise RegistryError(f"--set {where}: {message}") from None


def load_registry(path: str | Path) -> Registry:
    """Read, validate and resolve an adapters.yaml; raise ``RegistryError`` naming each problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise RegistryError(f"{path}: cannot read: {err}") from err
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: top level must be a mapping")
    try:
        registry = Registry.model_validate(raw)
    except ValidationError as err:
        raise RegistryError(format_validation_error(path, raw, err)) from None
    problems = check_trained_on(registry)
    resolve_local_base(registry, path.parent)
    resolve_kernel_configs(registry.engine.sglang, path.parent)
    problems += check_adapters(registry, path.parent)
    if problems:
        raise RegistryError(f"{path}:\n  " + "\n  ".join(problems))
    return registry


def format_validation_error(path: Path, raw: dict, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} problem(s):"]
    for e in err.errors():
        loc = e["loc"]
        where = ".".join(str(p) for p in loc)
        if len(loc) >= 2 and loc[0] == "adapters" and isinstance(loc[1], int):
            where = entry_label(raw, loc[1]) + " → " + ".".join(str(p) for p in loc[2:])
        message = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def entry_label(raw: dict, index: int) -> str:
    entries = raw.get("adapters") or []
    name = entries[index].get("name") if isinstance(entries[index], dict) else None
    return f"adapters[{index}]" + (f" '{name}'" if name else "")


def resolve_local_base(registry: Registry, root: Path) -> None:
    """A relative ``base.model`` naming a folder beside the YAML file resolves against it."""
    candidate = root / registry.base.model
    if not Path(registry.base.model).is_absolute() and candidate.is_dir():
        registry.base.model = str(candidate.resolve())


def resolve_kernel_configs(settings: SGLangSettings, root: Path) -> None:
    folder = settings.lora_kernel_configs
    if folder not in (None, "auto") and not Path(folder).expanduser().is_absolute():
        settings.lora_kernel_configs = str((root / folder).resolve())


def check_trained_on(registry: Registry) -> list[str]:
    return [
        f"adapters[{i}] '{spec.name}' → trained_on: '{spec.trained_on}', but this file's "
        f"base.model is '{registry.base.model}' (serve it from a registry with that base)"
        for i, spec in enumerate(registry.adapters)
        if spec.trained_on and spec.trained_on != registry.base.model
    ]


def check_adapters(registry: Registry, root: Path) -> list[str]:
    """Resolve relative paths and check names are unique and directories hold an adapter."""
    problems, seen = [], {}
    for i, spec in enumerate(registry.adapters):
        label = f"adapters[{i}] '{spec.name}'"
        if spec.name in seen:
            problems.append(f"{label} → name: duplicate of adapters[{seen[spec.name]}]")
        seen.setdefault(spec.name, i)
        if not spec.path.is_absolute():
            spec.path = (root / spec.path).resolve()
        problems += [f"{label} → path: {p}" for p in adapter_dir_problems(spec.path)]
        for j, example in enumerate(spec.examples):
            missing = set(template_fields(spec.template)) - set(example)
            if missing:
                problems.append(f"{label} → examples[{j}]: missing fields {sorted(missing)}")
    return problems


def adapter_dir_problems(path: Path) -> list[str]:
    if not path.is_dir():
        return [f"no such directory: {path}"]
    if not (path / "adapter_config.json").is_file():
        return [f"no adapter_config.json in {path}"]
    if not any(path.glob("adapter_model.*")):
        return [f"no adapter_model.safetensors in {path}"]
    try:
        json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError as err:
        return [f"adapter_config.json is not valid JSON: {err}"]
    return []
