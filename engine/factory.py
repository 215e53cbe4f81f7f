"""Build the engine adapters.yaml describes: resolve base, check adapters fit, pick a backend."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from .backends.common import adapter_problems
from .base_model import display_name, resolve_base
from .interface import Engine
from .registry import Registry, RegistryError, load_registry

log = logging.getLogger(__name__)


def choose_backend(requested: str) -> str:
    """``auto`` → ``sglang`` when CUDA and sglang are both present, else ``hf``."""
    if requested != "auto":
        return requested
    import torch

    has_cuda = torch.cuda.is_available()
    has_sglang = importlib.util.find_spec("sglang") is not None
    choice = "sglang" if has_cuda and has_sglang else "hf"
    log.info("backend auto → %s (cuda=%s, sglang=%s)", choice, has_cuda, has_sglang)
    return choice


def check_fit(registry: Registry, base_dir: str, backend: str) -> None:
    """Every adapter fits the base and can be served by the backend: checked once, at start."""
    if not Path(base_dir).is_dir():
        return  # a hub id: shapes are checked when the adapter is loaded
    problems = [
        f"adapters[{i}] '{spec.name}' → path: {problem}"
        for i, spec in enumerate(registry.adapters)
        for problem in adapter_problems(spec.path, base_dir, backend, max_rank=None)
    ]
    if problems:
        raise RegistryError("adapters that do not fit the base model:\n  " + "\n  ".join(problems))


def build_engine(
    registry: Registry | str | Path = "adapters.yaml", backend: str | None = None
) -> Engine:
    if not isinstance(registry, Registry):
        registry = load_registry(registry)
    base_dir = resolve_base(registry.base.model)
    choice = choose_backend(backend or registry.engine.backend)
    check_fit(registry, base_dir, choice)
    adapters = {spec.name: str(spec.path) for spec in registry.adapters}
    common = dict(
        base_dir=base_dir,
        base_model_id=registry.base.name or display_name(registry.base.model, base_dir),
        adapters=adapters,
        dtype=registry.base.dtype,
        chat_template=registry.base.chat_template,
    )
    log.info("starting %s backend with %d adapters", choice, len(adapters))
    if choice == "sglang":
        from .backends.sglang import SGLangEngine

        return SGLangEngine(settings=registry.engine.sglang, **common)
    from .backends.hf import HFEngine

    return HFEngine(settings=registry.engine.hf, **common)
