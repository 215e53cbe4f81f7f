"""Checks both backends make before loading an adapter or admitting a request, and the prompt's
tokenization off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import contextlib
import dataclasses
import json
import multiprocessing
from pathlib import Path

from ..base_model import adapter_fit_problems
from ..interface import (
    AdapterConflictError,
    AdapterLoadError,
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
)
from ..registry import SLUG, adapter_dir_problems
from ..text import check_ids, prompt_token_ids, template_messages, token_text, vocabulary_size

OFF_LOOP_CHARS = 8192
"""Prompts longer than this are tokenized in a worker process, so the event loop keeps serving."""


def support_problems(config: dict, backend: str) -> list[str]:
    """What in a peft LoRA config the backend cannot serve in a mixed batch."""
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported: mixed-adapter batches cannot run it")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} is not supported")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} is not supported (only 'none')")
    if backend == "sglang":
        if config.get("use_rslora"):
            problems.append("use_rslora is not supported by SGLang (it scales by alpha/r)")
        for key in ("rank_pattern", "alpha_pattern"):
            if config.get(key):
                problems.append(f"{key} is not supported by SGLang (one rank and alpha)")
    return problems


def adapter_problems(path: Path, base_dir: str, backend: str, max_rank: int | None) -> list[str]:
    """Every reason this adapter directory cannot be served on this base by this backend."""
    problems = adapter_dir_problems(path)
    if problems:
        return problems
    config = json.loads((path / "adapter_config.json").read_text())
    if not isinstance(config, dict):
        return ["adapter_config.json is not a JSON object"]
    problems = support_problems(config, backend)
    rank = config.get("r")
    if max_rank is not None and isinstance(rank, int) and rank > max_rank:
        problems.append(f"rank {rank} is above the server's maximum ({max_rank})")
    return problems or adapter_fit_problems(path, base_dir)


def check_loadable(
    name: str,
    path: Path,
    loaded: set[str],
    base_dir: str,
    backend: str,
    max_rank: int | None,
    changing: set[str] = frozenset(),
) -> None:
    """Hot-load guard: a slug not in use (``changing``: names being loaded or unloaded), and an
    adapter this backend can serve on this base."""
    if not SLUG.match(name):
        raise AdapterLoadError(f"adapter name {name!r} must be a slug (a-z, 0-9, -, _)")
    if name in loaded:
        raise AdapterConflictError(f"adapter '{name}' is already loaded")
    if name in changing:
        raise AdapterConflictError(f"adapter '{name}' is being loaded or unloaded")
    try:
        problems = adapter_problems(path, base_dir, backend, max_rank)
    except (OSError, ValueError) as err:
        problems = [f"cannot read it: {err}"]
    if problems:
        raise AdapterLoadError(f"adapter '{name}' cannot be served: {problems[0]}")


@contextlib.contextmanager
def holding(changing: set[str], name: str):
    """``name`` in ``changing`` while a load or unload of it runs (``check_loadable`` refuses a
    second load meanwhile)."""
    changing.add(name)
    try:
        yield
    finally:
        changing.discard(name)


def fit_to_context(
    prompt_tokens: int,
    request: GenerationRequest,
    context: int,
    reserved: int = 0,
    longest_prompt: int | None = None,
) -> None:
    """The prompt and the answer's ``max_tokens`` fit the context, or a 400. A default
    ``max_tokens`` (``fit_max_tokens``) is first lowered to the room left, less the ``reserved``
    tokens the engine keeps back from an answer, down to ``min_tokens`` (at least 1), in a copy
    of the request's params (callers may share one among requests). ``longest_prompt``: the
    most prompt tokens the engine takes, if it takes fewer than the room leaves."""
    params, field = request.params, "messages" if request.messages is not None else "prompt"
    if longest_prompt is not None and prompt_tokens > longest_prompt:
        raise PromptTooLongError(
            f"This model's maximum context length is {context} tokens. However, the prompt is "
            f"{prompt_tokens} tokens, and this engine takes at most {longest_prompt}. Please "
            "reduce the length of the prompt.",
            field,
        )
    limit = context - reserved if params.fit_max_tokens else context  # SGLang cuts explicit ones
    if prompt_tokens + params.max_tokens <= limit:
        return
    if not params.fit_max_tokens:
        raise PromptTooLongError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + params.max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{params.max_tokens} for the answer: max_tokens). Please reduce the length of the "
            "prompt or max_tokens.",
            "max_tokens",
        )
    room, least = context - reserved - prompt_tokens, max(params.min_tokens, 1)
    if room < least:
        kept = f", less {reserved} this engine keeps back," if reserved else ""
        raise PromptTooLongError(
            f"This model's maximum context length is {context} tokens. However, the prompt is "
            f"{prompt_tokens} tokens, which leaves{kept} {max(room, 0)} for the answer (at "
            f"least {least}). Please reduce the length of the prompt.",
            field,
        )
    request.params = dataclasses.replace(params, max_tokens=room)


def longest_token_chars(tokenizer) -> int:
    """The most characters one token decodes to: a prompt longer than context × this cannot
    fit, whatever it says."""
    return max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


MESSAGE_CHARS = 32
"""What a message costs beyond its content (role, turn markers), counted as characters: many
empty messages are a long prompt too."""


def prompt_chars(request: GenerationRequest) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    messages = template_messages(request.messages or [])
    return sum(len(m["content"]) + MESSAGE_CHARS for m in messages)


WORKER_TOKENIZER = None


def load_worker_tokenizer(base_dir: str) -> None:
    global WORKER_TOKENIZER
    from transformers import AutoTokenizer

    WORKER_TOKENIZER = AutoTokenizer.from_pretrained(base_dir)


def worker_token_ids(request: GenerationRequest, chat_template: bool) -> list[int]:
    return prompt_token_ids(WORKER_TOKENIZER, request, chat_template)


class PromptTokenizer:
    """A request's prompt → token ids without holding up the event loop: a prompt longer than
    ``context`` × the longest token cannot fit and is refused untokenized; a short one is
    tokenized at once; a long one in a worker process of its own (so neither its CPU nor the
    interpreter lock is taken from the streams the loop serves)."""

    def __init__(self, tokenizer, base_dir: str, chat_template: bool, context: int):
        self.tokenizer, self.base_dir, self.chat_template = tokenizer, base_dir, chat_template
        self.context = context
        self.limit = context * longest_token_chars(tokenizer)
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.last: tuple | None = None
        """The last prompt tokenized in this turn of the event loop and its ids: a request's
        ``n`` copies share its prompt's objects and start in one turn, and each copy tokenized
        again held the loop (64 copies of 8,192 emoji: 1 s). Forgotten at the next turn, so a
        list changed in place later is tokenized afresh."""

    async def __call__(self, request: GenerationRequest) -> list[int]:
        if (ids := self.copy_of_last(request)) is not None:
            return ids
        ids = await self.token_ids(request)
        if self.last is None:
            asyncio.get_running_loop().call_soon(self.forget)
        self.last = (asyncio.get_running_loop(), request.prompt, request.messages,
                     request.prompt_ids, dict(request.params.logit_bias), ids)  # fmt: skip
        return list(ids)

    def forget(self) -> None:
        self.last = None

    def copy_of_last(self, request: GenerationRequest) -> list[int] | None:
        if self.last is None:
            return None
        loop, prompt, messages, prompt_ids, bias, ids = self.last
        same = (
            loop is asyncio.get_running_loop()  # a loop that stopped never ran ``forget``
            and request.prompt is prompt
            and request.messages is messages
            and request.prompt_ids is prompt_ids
            and request.params.logit_bias == bias
        )
        return list(ids) if same else None

    async def token_ids(self, request: GenerationRequest) -> list[int]:
        chars = prompt_chars(request)
        if chars > self.limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.context} tokens. "
                f"However, the prompt of {chars} characters cannot fit it (at most {self.limit} "
                "characters). Please reduce the length of the prompt.",
                "prompt" if request.prompt is not None else "messages",
            )
        if chars <= OFF_LOOP_CHARS:
            return prompt_token_ids(self.tokenizer, request, self.chat_template)
        if self.pool is None:
            context = multiprocessing.get_context("spawn")
            self.pool = concurrent.futures.ProcessPoolExecutor(
                1, context, initializer=load_worker_tokenizer, initargs=(self.base_dir,)
            )
        pool, loop = self.pool, asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, worker_token_ids, request, self.chat_template)
        except concurrent.futures.process.BrokenProcessPool:
            if self.pool is pool:  # the next long prompt starts a fresh worker (once)
                self.pool = None
            raise EngineError("the tokenizer worker stopped; send the request again") from None

    def close(self) -> None:
        """Ends the worker process and waits for it: the server re-raises its SIGTERM right
        after shutting down, which would otherwise kill it before the worker is told to stop
        (the worker and multiprocessing's resource tracker were left running)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class Tokenizes:
    """``Engine.tokenize`` / ``detokenize`` for a backend that tokenizes its own prompts: its
    ``prompt_tokenizer`` (the same path, limit and worker as a generation's), ``tokenizer`` and
    ``context``."""

    prompt_tokenizer: PromptTokenizer
    context: int
    reserved_tokens = 0
    """Tokens the engine keeps back from each answer, below the context (``fit_to_context``)."""

    @property
    def context_length(self) -> int:
        return self.context

    @property
    def longest_prompt(self) -> int:
        """The most prompt tokens a generation takes."""
        return self.context - 1

    async def tokenize(
        self, request: GenerationRequest, token_strs: bool = False
    ) -> tuple[list[int], list[str] | None]:
        request.validate()
        ids = await self.prompt_tokenizer(request)
        if len(ids) > self.context:  # as detokenize: the answer stays within the context
            raise PromptTooLongError(
                f"This model's maximum context length is {self.context} tokens. However, the "
                f"prompt is {len(ids)} tokens. Please reduce the length of the prompt.",
                "prompt" if request.prompt is not None else "messages",
            )
        tokenizer = self.prompt_tokenizer.tokenizer
        return ids, [token_text(tokenizer, i) for i in ids] if token_strs else None

    async def detokenize(self, ids: list[int]) -> str:
        if len(ids) > self.context:
            raise InvalidRequestError(
                f"tokens: at most the context's {self.context} ids ({len(ids)} given)", "tokens"
            )
        check_ids(vocabulary_size(self.prompt_tokenizer.tokenizer), ids, "tokens")
        return self.prompt_tokenizer.tokenizer.decode(ids)
