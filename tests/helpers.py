"""Test helpers: random (non-zero) peft LoRA adapters, which change the output (also used by
lab/gpu_check.py)."""

from __future__ import annotations

from pathlib import Path


def make_peft_adapter(
    base_dir: str,
    out: str | Path,
    r: int,
    target_modules: list[str],
    seed: int,
    layers: list[int] | None = None,
    **lora,
) -> str:
    """Save a real peft LoRA with ``init_lora_weights=False`` (random A and B) to ``out``;
    ``layers`` limits it to those decoder layers (``layers_to_transform``), ``lora`` passes
    further ``LoraConfig`` options (``use_dora=True``, ...)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=target_modules,
        init_lora_weights=False,
        layers_to_transform=layers,
        **lora,
    )
    get_peft_model(model, config).save_pretrained(str(out))
    return str(out)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
"""A tool of the tool-call tests (``tests/test_tools.py``) and of ``lab/gpu_check.py``."""
