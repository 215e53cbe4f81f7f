"""CPU default backend: transformers with every adapter on one model, mixed-adapter batches.

One worker thread owns the model. Each step it admits waiting requests (prefilled together,
left-padded, up to ``prefill_tokens``; a longer prompt a chunk a step; requests with the same
prompt and adapter, such as a request's ``n`` copies, prefilled once and its cache copied to each),
merges them into the running batch, and decodes one token for every row, each row
with its own adapter: on the CPU by default every row's LoRA in one gathered op per layer over
fp16 base weights (``lora_batched.py``; ``base_weights: fp32`` is the exact mode), else peft's
``adapter_names``. Finished or cancelled rows leave the batch at once, so their slot is free for
the next request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..interface import (
    AdapterLoadError,
    Chunk,
    Engine,
    EngineError,
    GenerationRequest,
    RequestClock,
    RequestEndedError,
    TokenLogprob,
    Usage,
)
from ..registry import HFSettings
from ..text import TextStream, end_of_turn_ids, token_text
from .common import PromptTokenizer, Tokenizes, check_loadable, fit_to_context, holding
from .lora_batched import BatchedLora
from .sample import Grammar, Grammars, adjusted, choose, logprob_entry

log = logging.getLogger(__name__)
STALLED_AFTER_S = 300.0  # one step (a prefill of a full batch included) never takes this long
PEFT_BASE_ROW = "__base__"  # peft's adapter_names entry for a row that uses no adapter


class PrefillKey:
    """A prompt's ids and adapter, hashed once: waiting rows are matched by it every step."""

    __slots__ = ("adapter", "hash", "ids")

    def __init__(self, adapter: str | None, ids: list[int]):
        self.adapter, self.ids = adapter, tuple(ids)
        self.hash = hash((adapter, self.ids))

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrefillKey):
            return NotImplemented
        return (self.hash, self.adapter, self.ids) == (other.hash, other.adapter, other.ids)


@dataclass
class Row:
    """One request in flight: its prompt, what it generated, and where its chunks go."""

    request: GenerationRequest
    prompt_ids: list[int]
    text: TextStream
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    clock: RequestClock = field(default_factory=RequestClock)
    generated: list[int] = field(default_factory=list)
    rng: torch.Generator | None = None
    grammar: Grammar | None = None
    cancelled: bool = False
    done: bool = False

    @property
    def adapter_key(self) -> str:
        return self.request.adapter or PEFT_BASE_ROW

    @cached_property
    def prefill_key(self) -> PrefillKey:
        """Rows with equal keys have the same prefill: one computes it for all."""
        return PrefillKey(self.request.adapter, self.prompt_ids)

    @property
    def ended(self) -> bool:
        return self.cancelled or self.done

    def send(self, item: Chunk | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # its event loop has closed: nobody reads this row any more
            self.cancelled = True

    def fail(self, err: Exception) -> None:
        """End this row with an error delivered to its own stream only."""
        if not self.done:
            self.done = True
            wrapped = (
                err if isinstance(err, EngineError) else EngineError(f"generation failed: {err}")
            )
            self.send(wrapped)


@dataclass
class ChunkedPrefill:
    """A prompt longer than one step's prefill, ``done`` of its tokens in ``cache`` so far, for
    ``rows`` (the requests with this prompt and adapter)."""

    rows: list[Row]
    cache: object
    done: int = 0

    def join(self, candidates: list[Row]) -> list[Row]:
        """The candidates with this prompt and adapter join the prefill (its cache so far is
        theirs too); returns them."""
        twins = [r for r in candidates if r.prefill_key == self.rows[0].prefill_key]
        for row in twins:
            row.clock.start()
        self.rows += twins
        return twins


@dataclass
class Batch:
    """Running rows and their shared, left-padded KV cache."""

    rows: list[Row]
    cache: object
    mask: torch.Tensor
    next_tokens: torch.Tensor


class PeftRows:
    """One PeftModel holding every adapter; a mixed batch runs peft's loop over its adapters."""

    def __init__(self, model):
        self.model = model.eval()
        self.names: set[str] = set()

    def attach(self, name: str, path: str) -> None:
        from peft import PeftModel

        if not self.names:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        self.names.add(name)

    def detach(self, name: str) -> None:
        self.names.discard(name)
        if self.names:
            self.model.set_adapter(sorted(self.names)[0])
            self.model.delete_adapter(name)
        else:
            self.model = self.model.unload()

    def row_kwargs(self, adapters: list[str | None]) -> dict:
        if not self.names:
            return {}
        return {"adapter_names": [a or PEFT_BASE_ROW for a in adapters]}


class BatchedRows:
    """Every row's LoRA in one gathered op per layer (``lora_batched.BatchedLora``), over a base
    whose Linear weights are ``settings.base_weights``."""

    def __init__(self, model, settings: HFSettings):
        self.model = BatchedLora(model, base_weights=settings.base_weights)

    def attach(self, name: str, path: str) -> None:
        self.model.load_adapter(name, path)

    def detach(self, name: str) -> None:
        self.model.delete_adapter(name)

    def row_kwargs(self, adapters: list[str | None]) -> dict:
        return {"adapter_index": self.model.index_for(adapters)}


class HFEngine(Tokenizes, Engine):
    backend = "hf"

    def __init__(
        self,
        base_dir: str,
        base_model_id: str,
        adapters: dict[str, str] | None = None,
        settings: HFSettings | None = None,
        dtype: str = "auto",
        chat_template: bool = True,
        device: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings or HFSettings()
        self.base_dir = base_dir
        self.base_model_id = base_model_id
        self.chat_template = chat_template
        self.torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = device_label(self.torch_device)
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=self.resolve_dtype(dtype)).to(
            self.torch_device
        )
        self.attention_balance = attention_balance(model)
        batched = self.settings.lora == "batched" and self.torch_device.type == "cpu"
        self.lora = BatchedRows(model, self.settings) if batched else PeftRows(model)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.prompt_tokenizer = PromptTokenizer(
            self.tokenizer, base_dir, chat_template, self.context
        )
        self.eos_ids = self.find_eos_ids()
        self.grammars = Grammars(self.tokenizer, self.model.config.vocab_size)
        self.names: set[str] = set()
        self.adapter_paths: dict[str, str] = {}
        self.changing: set[str] = set()
        """Names being loaded: a second load of one is a conflict."""
        for name, path in (adapters or {}).items():
            self.attach_adapter(name, path)
        self.pending: list[Row] = []
        self.rows: dict[str, Row] = {}
        """Every admitted request's row by request id, until its stream closes."""
        self.admitting: set[str] = set()
        """Request ids being tokenized: an abort meanwhile is kept in ``early_aborts``."""
        self.early_aborts: dict[str, str] = {}
        self.controls: list[tuple] = []
        self.batch: Batch | None = None
        self.chunked: ChunkedPrefill | None = None
        """The one long prompt being prefilled a chunk a step, if any."""
        self.wake = threading.Condition()
        self.stopping = False
        self.peak_running = 0
        self.generated_tokens = 0
        self.rebuilt = False
        self.step_started: float | None = None
        """When the step in progress began (None between steps): a stuck step shows in health."""
        self.worker = threading.Thread(target=self.run, name="hf-engine", daemon=True)
        self.worker.start()
        log.info("hf engine ready on %s with adapters %s", self.device, sorted(self.names))

    def resolve_dtype(self, dtype: str) -> torch.dtype:
        if dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, dtype)

    def find_eos_ids(self) -> set[int]:
        ids = end_of_turn_ids(self.tokenizer)
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    # ----- adapters -------------------------------------------------------------------------

    def adapters(self) -> list[str]:
        return sorted(self.names)

    def attach_adapter(self, name: str, path: str) -> None:
        """Load into the model; the caller checked it fits (at start, or on hot-load)."""
        self.lora.attach(name, path)
        self.names.add(name)
        self.adapter_paths[name] = str(path)

    def detach_adapter(self, name: str) -> None:
        self.lora.detach(name)
        self.names.discard(name)
        self.adapter_paths.pop(name, None)

    @property
    def model(self):
        return self.lora.model

    async def load_adapter(self, name: str, path: str, max_rank: int | None = None) -> None:
        loaded, where = set(self.adapter_paths), Path(path)
        check_loadable(name, where, loaded, self.base_dir, self.backend, max_rank, self.changing)
        with holding(self.changing, name):  # peft would load a second one over the first
            await self.control("load", name, path)

    async def unload_adapter(self, name: str) -> None:
        """New requests for it are refused at once; it leaves when its running rows finish."""
        self.check_adapter(name)
        self.names.discard(name)
        try:
            await self.control("unload", name)
        except Exception:
            self.names.add(name)
            raise

    async def control(self, *op) -> None:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.wake:
            self.controls.append((*op, future))
            self.wake.notify()
        await asyncio.wrap_future(future)

    def apply_controls(self) -> None:
        busy = {row.adapter_key for row in self.active_rows()}
        waiting = []
        for kind, name, *args, future in self.controls:
            if kind == "unload" and name in busy:
                waiting.append((kind, name, *args, future))
                continue
            try:
                self.attach_adapter(name, *args) if kind == "load" else self.detach_adapter(name)
                future.set_result(None)
            except Exception as err:
                future.set_exception(
                    err if isinstance(err, EngineError) else AdapterLoadError(str(err))
                )
        self.controls = waiting

    # ----- requests -------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        rid = request.request_id
        self.admitting.add(rid)
        try:
            row = await self.admit_request(request)
        finally:
            self.admitting.discard(rid)
            why = self.early_aborts.pop(rid, None)
        if why is not None:
            row.cancelled = True
            raise RequestEndedError(why)
        self.rows[rid] = row
        try:
            while True:
                item = await row.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.rows.pop(request.request_id, None)
            if not row.done:
                row.cancelled = True
                with self.wake:
                    self.wake.notify()

    async def admit_request(self, request: GenerationRequest) -> Row:
        request.validate()
        self.check_adapter(request.adapter)
        ids = await self.prompt_tokenizer(request)
        fit_to_context(len(ids), request, self.context)  # may fit a default max_tokens: a copy
        params = request.params
        row = Row(
            request=request,
            prompt_ids=ids,
            text=TextStream(self.tokenizer, params.stop),
            queue=asyncio.Queue(),
            loop=asyncio.get_running_loop(),
        )
        if params.seed is not None:
            row.rng = torch.Generator().manual_seed(params.seed)
        if params.constraint is not None:
            row.grammar = await asyncio.to_thread(self.grammars.compile, params.constraint)
        self.check_adapter(request.adapter)  # still served after the awaits above
        with self.wake:
            self.pending.append(row)
            self.wake.notify()
        return row

    def abort(self, request_id: str, why: str) -> None:
        """Wherever the row is (waiting, in a prefill, in the batch), it ends at once."""
        why = why or "the request was ended"
        row = self.rows.get(request_id)
        if row is None and request_id in self.admitting:  # tokenizing: it ends once admitted
            self.early_aborts[request_id] = why
        if row is not None:
            row.fail(RequestEndedError(why))
            with self.wake:
                self.wake.notify()

    def running_rows(self) -> list[Row]:
        """The rows decoding, then those whose prompt is being chunked."""
        return [
            *(self.batch.rows if self.batch else []),
            *(self.chunked.rows if self.chunked else []),
        ]

    def active_rows(self) -> list[Row]:
        return self.running_rows() + self.pending

    async def health(self) -> dict:
        """A dead worker is unhealthy, and so is one whose step has run for more than
        ``STALLED_AFTER_S``; a busy one that steps is healthy without a probe queued behind the
        users' requests; an idle one answers a one-token probe."""
        if not self.worker.is_alive():
            raise EngineError("the generation worker has stopped")
        started = self.step_started
        if started is not None and (running := time.monotonic() - started) > STALLED_AFTER_S:
            raise EngineError(f"one generation step has run for {running:.0f} s")
        if self.batch is not None or self.chunked is not None:
            return self.health_report(True)
        return await super().health()

    def stats(self) -> dict:
        batch, chunked = self.batch, self.chunked  # the worker may end them meanwhile
        running = (len(batch.rows) if batch else 0) + (len(chunked.rows) if chunked else 0)
        return {
            "running": running,
            "queued": len(self.pending),
            "adapters_loaded": len(self.names),
            "generated_tokens": self.generated_tokens,
        }

    async def shutdown(self) -> None:
        self.prompt_tokenizer.close()
        with self.wake:
            self.stopping = True
            self.wake.notify()
        await asyncio.to_thread(self.worker.join, 10)

    # ----- the worker -----------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self.wake:
                while not (
                    self.stopping or self.pending or self.batch or self.chunked or self.controls
                ):
                    self.wake.wait()
                if self.stopping:
                    return
                if self.controls:
                    self.apply_controls()
                fresh = self.take_pending()
            self.step_started = time.monotonic()
            with torch.inference_mode():
                try:
                    self.step(fresh)
                except Exception as err:  # outside the per-row recovery: end them, keep serving
                    log.exception("generation step failed: ending %d rows", len(fresh))
                    self.fail_all(fresh, err)
            self.step_started = None

    def fail_all(self, fresh: list[Row], err: Exception) -> None:
        for row in self.running_rows() + fresh:
            row.fail(err)
        self.batch = self.chunked = None

    def take_pending(self) -> list[Row]:
        """The waiting rows this step admits, in order, while there is room in the batch. Rows
        with the prompt being chunked join its prefill; then a prompt longer than
        ``prefill_tokens`` (chunked) with the rows that share it, when none is chunking, else
        short ones while their padded prompts, each distinct prefill once, fit in
        ``prefill_tokens`` (long ones wait their turn)."""
        self.pending = [r for r in self.pending if not r.ended]
        running = self.running_rows()
        room = self.fair_room(self.settings.max_batch_size - len(running), running)
        joined = {id(row) for row in (self.chunked.join(room) if self.chunked else [])}
        fresh = self.prefills_from([row for row in room if id(row) not in joined])
        taken = joined | {id(row) for row in fresh}
        self.pending = [row for row in self.pending if id(row) not in taken]
        return fresh

    def fair_room(self, free: int, running: list[Row]) -> list[Row]:
        """Up to ``free`` waiting rows, in order, but no more rows of one client request (its
        ``group``) running than three quarters of the batch (at least one): a request with
        ``n`` of 16 once held every row for minutes while a one-token request waited. Past the
        share a request's rows wait for its own earlier ones (and are prefilled then)."""
        share = max(1, self.settings.max_batch_size * 3 // 4)
        held = Counter(row.request.group for row in running)
        room = []
        for row in self.pending:
            if len(room) == free:
                break
            group = row.request.group
            if group is not None and held[group] >= share:
                continue
            held[group] += 1
            room.append(row)
        return room

    def prefills_from(self, room: list[Row]) -> list[Row]:
        budget, fresh, width, prefills = self.settings.prefill_tokens, [], 0, set()
        for row in room:
            if len(row.prompt_ids) > budget:
                if fresh or self.chunked is not None:
                    continue
                return [r for r in room if r.prefill_key == row.prefill_key]
            if row.prefill_key in prefills:
                fresh.append(row)
                continue
            width = max(width, len(row.prompt_ids))
            if (len(prefills) + 1) * width > budget:
                break
            prefills.add(row.prefill_key)
            fresh.append(row)
        return fresh

    def step(self, fresh: list[Row]) -> None:
        """Admit ``fresh`` rows and decode one token for every row. A failure is kept to the
        rows that cause it: a failed prefill is retried row by row, a failed decode rebuilds
        each row's cache alone, and only a row that fails by itself gets the error."""
        self.drop_rows()
        if fresh and len(fresh[0].prompt_ids) > self.settings.prefill_tokens:
            self.chunked = ChunkedPrefill(fresh, new_cache())
        elif fresh:
            self.admit(fresh)
        if self.chunked:
            self.prefill_chunk()
        if not self.batch:
            return
        try:
            self.decode()
        except Exception as err:
            if self.rebuilt:  # fails in a batch, never alone: end these rows, keep serving
                log.exception("decode failed again after a rebuild: ending its rows")
                for row in self.batch.rows:
                    row.fail(err)
                self.batch = None
                return
            log.exception("decode step failed: rebuilding the batch row by row")
            self.rebuild()
            return
        self.rebuilt = False
        self.drop_rows()

    def admit(self, fresh: list[Row]) -> None:
        try:
            batches = [self.prefill(fresh)]
        except Exception:
            log.exception("prefill of %d rows failed: retrying each alone", len(fresh))
            batches = [b for row in fresh if (b := self.alone(row, self.prefill))]
        for batch in batches:
            self.batch = merge_batches(self.batch, batch)
        self.peak_running = max(self.peak_running, len(self.batch.rows) if self.batch else 0)
        self.drop_rows()

    def prefill_chunk(self) -> None:
        """The chunked prompt's next chunk (``chunk_tokens``) for its rows; after its last, they
        join the batch, each with its own copy of the cache."""
        job, self.chunked = self.chunked, None
        rows = job.rows = [r for r in job.rows if not r.ended]
        if not rows:
            return
        if job.done == 0:
            for row in rows:
                row.clock.start()
        row = rows[0]
        size = chunk_tokens(self.settings.prefill_tokens, job.done, self.attention_balance)
        ids = row.prompt_ids[job.done : job.done + size]
        end = job.done + len(ids)
        input_ids = torch.tensor([ids], device=self.torch_device)
        mask = torch.ones(1, end, dtype=torch.long, device=self.torch_device)
        positions = torch.arange(job.done, end, device=self.torch_device).unsqueeze(0)
        try:
            logits, job.cache = self.forward([row], input_ids, mask, positions, job.cache)
        except Exception as err:
            log.exception("prefill chunk of row %s failed", row.request.request_id)
            for failed in rows:
                failed.fail(err)
            return
        job.done = end
        if end < len(row.prompt_ids):
            self.chunked = job
            return
        try:
            cache, mask, logits = shared_prefill(job.cache, mask, logits, [0] * len(rows))
            batch = Batch(rows, cache, mask, self.sample_and_emit(rows, logits))
            self.batch = merge_batches(self.batch, batch)
        except Exception as err:  # the running rows go on; these end with the error
            log.exception("row %s could not join the batch", row.request.request_id)
            for failed in rows:
                failed.fail(err)
            return
        self.peak_running = max(self.peak_running, len(self.batch.rows))
        self.drop_rows()

    def alone(self, row: Row, build):
        try:
            return build([row])
        except Exception as err:
            log.exception("row %s failed on its own", row.request.request_id)
            row.fail(err)
            return None

    def rebuild(self) -> None:
        self.rebuilt = True
        rows, self.batch = self.batch.rows, None
        for batch in [b for row in rows if (b := self.alone(row, self.replay))]:
            self.batch = merge_batches(self.batch, batch)
        self.drop_rows()

    def forward(self, rows: list[Row], input_ids, mask, positions, cache=None):
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position is sampled from
            **self.lora.row_kwargs([row.request.adapter for row in rows]),
        )
        return out.logits[:, -1, :].float(), out.past_key_values

    def prefill(self, rows: list[Row]) -> Batch:
        """Each distinct prefill once (rows with the same prompt and adapter share one), then
        every row's own copy of its cache and logits."""
        for row in rows:
            row.clock.start()
        firsts: dict[tuple, int] = {}
        distinct: list[Row] = []
        index = []
        for row in rows:
            if row.prefill_key not in firsts:
                firsts[row.prefill_key] = len(distinct)
                distinct.append(row)
            index.append(firsts[row.prefill_key])
        width = max(len(r.prompt_ids) for r in distinct)
        pad = self.tokenizer.pad_token_id
        ids = [[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in distinct]
        mask = [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in distinct]
        input_ids = torch.tensor(ids, device=self.torch_device)
        mask = torch.tensor(mask, device=self.torch_device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self.forward(distinct, input_ids, mask, positions, new_cache())
        cache, mask, logits = shared_prefill(cache, mask, logits, index)
        return Batch(rows, cache, mask, self.sample_and_emit(rows, logits))

    def decode(self) -> None:
        batch = self.batch
        positions = batch.mask.sum(-1, keepdim=True)
        batch.mask = torch.cat([batch.mask, torch.ones_like(positions)], dim=-1)
        logits, batch.cache = self.forward(
            batch.rows, batch.next_tokens, batch.mask, positions, batch.cache
        )
        batch.next_tokens = self.sample_and_emit(batch.rows, logits)

    def replay(self, rows: list[Row]) -> Batch:
        """A row's cache rebuilt from its prompt and the tokens it generated (all but the last,
        which is the next input)."""
        (row,) = rows
        ids = row.prompt_ids + row.generated[:-1]
        input_ids = torch.tensor([ids], device=self.torch_device)
        mask = torch.ones_like(input_ids)
        positions = torch.arange(len(ids), device=self.torch_device).unsqueeze(0)
        _, cache = self.forward(rows, input_ids, mask, positions, new_cache())
        last = torch.tensor([[row.generated[-1]]], device=self.torch_device)
        return Batch(rows, cache, mask, last)

    def sample_and_emit(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        tokens = []
        for i, row in enumerate(rows):
            try:
                token, entry = self.choose_token(row, logits[i])
                self.emit(row, token, entry)
            except Exception as err:
                log.exception("sampling failed for row %s", row.request.request_id)
                row.fail(err)
                token = next(iter(self.eos_ids))
            tokens.append(token)
        return torch.tensor(tokens, device=self.torch_device).unsqueeze(-1)

    def choose_token(self, row: Row, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        params = row.request.params
        chosen_from = adjusted(logits, params, row.generated, row.grammar, self.eos_ids)
        token = choose(chosen_from, params, row.rng)
        if row.grammar is not None:
            row.grammar.accept(token)
        entry = None
        if params.logprobs is not None:
            entry = logprob_entry(logits, token, params.logprobs, self.token_text)
        return token, entry

    def token_text(self, token: int) -> str:
        return token_text(self.tokenizer, token)

    def emit(self, row: Row, token: int, entry: TokenLogprob | None = None) -> None:
        if row.done:  # ended meanwhile (aborted): it leaves the batch at the next step
            return
        row.clock.token()
        row.generated.append(token)
        self.generated_tokens += 1
        params = row.request.params
        is_eos = token in self.eos_ids and not params.ignore_eos
        delta = "" if is_eos else row.text.push(token)
        logprobs = None if entry is None else [] if is_eos else [entry]  # the text's tokens
        finish = None
        if is_eos or row.text.stopped or (row.grammar is not None and row.grammar.finished):
            finish = "stop"
        elif len(row.generated) >= params.max_tokens:
            finish = "length"
        if finish is None:
            row.send(Chunk(delta, [token], logprobs=logprobs))
            return
        row.done = True
        usage = Usage(len(row.prompt_ids), len(row.generated))
        tail = delta + row.text.flush()
        timings = row.clock.timings(len(row.generated))
        row.send(Chunk(tail, [token], finish, usage, timings, logprobs))

    def drop_rows(self) -> None:
        if not self.batch:
            return
        keep = [i for i, row in enumerate(self.batch.rows) if not (row.done or row.cancelled)]
        if len(keep) == len(self.batch.rows):
            return
        self.batch = select_rows(self.batch, keep) if keep else None


def attention_balance(model) -> int | None:
    """The context length at which a prompt token's attention over it costs as much as the rest
    of its forward: per layer, the layer's weights (two flops each) against four flops per
    context token and hidden unit (QKᵀ and the weighted sum of V). 3,073 for SmolLM2-135M
    (``results/serving/long-prompt-stall-cpu/``). None where the model's layers are not found."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    hidden = getattr(model.config, "hidden_size", None)
    if not layers or not hidden:
        return None
    return round(sum(p.numel() for p in layers[0].parameters()) / (2 * hidden))


def chunk_tokens(prefill_tokens: int, context: int, balance: int | None) -> int:
    """A long prompt's next chunk, smaller as its context grows, so each chunk's step costs
    about what the first did (the running rows' tokens wait no longer at its end)."""
    if balance is None:
        return prefill_tokens
    return max(16, round(prefill_tokens * balance / (balance + context)))


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k, v) for k, v, *_ in cache]


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def build_cache(tensors: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=tensors)


def shared_prefill(cache, mask: torch.Tensor, logits: torch.Tensor, index: list[int]):
    """Row i of the batch gets prefill ``index[i]``'s cache, mask and logits (a copy each, so
    rows that shared a prefill decode apart)."""
    if index == list(range(mask.shape[0])):
        return cache, mask, logits
    pick = torch.tensor(index, device=mask.device)
    tensors = [(k[pick], v[pick]) for k, v in cache_tensors(cache)]
    return build_cache(tensors), mask[pick], logits[pick]


def select_rows(batch: Batch, keep: list[int]) -> Batch:
    """Keep some rows, and trim left-padding columns no remaining row needs."""
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[index]
    start = int((mask.sum(0) > 0).nonzero()[0])
    tensors = [(k[index, :, start:], v[index, :, start:]) for k, v in cache_tensors(batch.cache)]
    return Batch(
        [batch.rows[i] for i in keep],
        build_cache(tensors),
        mask[:, start:],
        batch.next_tokens[index],
    )


def merge_batches(running: Batch | None, fresh: Batch) -> Batch:
    """Join two batches by left-padding the shorter one's cache and mask."""
    if running is None:
        return fresh
    width = max(running.mask.shape[1], fresh.mask.shape[1])
    tensors = [
        (torch.cat([left_pad(ka, width), left_pad(kb, width)]),
         torch.cat([left_pad(va, width), left_pad(vb, width)]))
        for (ka, va), (kb, vb) in zip(cache_tensors(running.cache), cache_tensors(fresh.cache))
    ]  # fmt: skip
    mask = torch.cat([left_pad(running.mask, width), left_pad(fresh.mask, width)])
    tokens = torch.cat([running.next_tokens, fresh.next_tokens])
    return Batch(running.rows + fresh.rows, build_cache(tensors), mask, tokens)


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence axis (-2 for K/V, -1 for a mask) on the left with zeros."""
    axis = -1 if t.dim() == 2 else -2
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)
