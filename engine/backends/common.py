"""Checks both backends make before loading an adapter or admitting a request."""

from __future__ import annotations

from pathlib import Path

from ..base_model import adapter_fit_problems
from ..interface import AdapterLoadError, PromptTooLongError, SamplingParams
from ..registry import SLUG, adapter_dir_problems


def check_loadable(name: str, path: Path, loaded: set[str], base_dir: str) -> None:
    if not SLUG.match(name):
        raise AdapterLoadError(f"adapter name {name!r} must be a slug (a-z, 0-9, -, _)")
    if name in loaded:
        raise AdapterLoadError(f"adapter '{name}' is already loaded")
    problems = adapter_dir_problems(path) or adapter_fit_problems(path, base_dir)
    if problems:
        raise AdapterLoadError(f"adapter '{name}' does not fit the base model: {problems[0]}")


def check_context(prompt_tokens: int, params: SamplingParams, context: int) -> None:
    if prompt_tokens + params.max_tokens > context:
        raise PromptTooLongError(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({params.max_tokens}) exceeds "
            f"the context of {context} tokens",
            "max_tokens",
        )
