"""Shared fixtures: the real SmolLM2 base (converted once) and small peft adapters made here."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from helpers import make_peft_adapter

from engine.base_model import resolve_base

os.environ.pop("LORALAND_API_KEY", None)  # the servers tests start answer without one

LORA_SETS = {
    "alpha": {"r": 8, "target_modules": ["q_proj", "v_proj"], "seed": 1},
    "beta": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "seed": 2},
}


@pytest.fixture(scope="session")
def base_dir() -> str:
    return resolve_base("smollm2")


@pytest.fixture(scope="session")
def adapter_dirs(base_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_peft_adapter(base_dir, root / name, **spec) for name, spec in LORA_SETS.items()
    }


@pytest.fixture(scope="session")
def hf_engine(base_dir, adapter_dirs):
    """The CPU default in its exact mode (fp32 base weights: tokens compared exactly)."""
    from engine.backends.hf import HFEngine
    from engine.registry import HFSettings

    exact = HFSettings(base_weights="fp32")
    engine = HFEngine(base_dir, "SmolLM2-135M-Instruct", adapters=adapter_dirs, settings=exact)
    yield engine
    asyncio.run(engine.shutdown())


def write_adapter_config(path, **overrides) -> None:
    config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "lora_alpha": 16}
    config.update(overrides)
    (path / "adapter_config.json").write_text(json.dumps(config))


class LiveServer:
    """A real uvicorn server on a free loopback port, run in a thread, with the product's HTTP
    implementation (``http``: uvicorn's name for it)."""

    def __init__(self, app, http: str = "auto"):
        import socket
        import threading

        import uvicorn

        from engine.api.server import http_protocol

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", http=http_protocol(http)
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def registry_for(adapter_dirs):
    """A Registry naming the test adapters, with templates and examples for the app."""
    from engine.registry import Registry

    return Registry.model_validate(
        {
            "adapters": [
                {
                    "name": "alpha",
                    "path": adapter_dirs["alpha"],
                    "task": "sentiment",
                    "category": "classification",
                    "description": "Test adapter alpha.",
                    "template": "Is this review positive or negative?\n{review}",
                    "examples": [{"review": "A joyless slog."}],
                    "generation": {"max_tokens": 12},
                    "eval": {"metric": "accuracy", "score": 0.9, "base_score": 0.5, "n": 10},
                },
                {
                    "name": "beta",
                    "path": adapter_dirs["beta"],
                    "task": "qa",
                    "category": "generation",
                    "template": "Context: {context}\nQuestion: {question}",
                    "examples": [{"context": "Paris is in France.", "question": "Where is Paris?"}],
                    "generation": {"max_tokens": 12},
                },
            ]
        }
    )


@pytest.fixture
def clean_environment(monkeypatch):
    """``sys.path``, the SGLang plugin's environment variables and ``SGLANG_PLUGINS`` as they
    were once the test ends (what the parent hands SGLang's processes through them)."""
    import sys

    from engine.backends import sglang_lora_batch, sglang_prefill_slots, sglang_radix

    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in (
        sglang_lora_batch.FLAG_ENV,
        sglang_radix.FRACTION_ENV,
        sglang_prefill_slots.MIN_SLOTS_ENV,
    ):
        monkeypatch.setenv(name, "")
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
