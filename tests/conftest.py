"""Shared fixtures: the real SmolLM2 base (converted once) and small peft adapters made here."""

from __future__ import annotations

import asyncio
import json

import pytest

from engine.base_model import resolve_base
from engine.random_adapter import make_peft_adapter

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
    from engine.backends.hf import HFEngine

    engine = HFEngine(base_dir, "SmolLM2-135M-Instruct", adapters=adapter_dirs)
    yield engine
    asyncio.run(engine.shutdown())


def write_adapter_config(path, **overrides) -> None:
    config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "lora_alpha": 16}
    config.update(overrides)
    (path / "adapter_config.json").write_text(json.dumps(config))
