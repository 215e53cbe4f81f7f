"""LoRA Land in a box: one engine interface over SGLang (GPU) and transformers + peft (CPU)."""

from .factory import build_engine, choose_backend
from .interface import (
    AdapterConflictError,
    AdapterLoadError,
    AdapterNotFoundError,
    Chunk,
    Completion,
    Engine,
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
    Timings,
    Usage,
)
from .registry import Registry, RegistryError, load_registry

__all__ = [
    "AdapterConflictError",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "Chunk",
    "Completion",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "InvalidRequestError",
    "PromptTooLongError",
    "Registry",
    "RegistryError",
    "SamplingParams",
    "Timings",
    "Usage",
    "build_engine",
    "choose_backend",
    "load_registry",
]
