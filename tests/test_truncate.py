"""finetune/truncate.py: a LoRA adapter at a lower rank is each layer's best low-rank update, and
peft loads it on the real base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.truncate import truncate


def updates(folder: Path) -> dict[str, torch.Tensor]:
    """Each layer's ΔW = B·A·(alpha/r), keyed by its A weight's name."""
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(folder / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    return {
        k: weights[k.replace(".lora_A.", ".lora_B.")].float() @ weights[k].float() * scale
        for k in weights
        if ".lora_A." in k
    }


def test_each_layer_becomes_its_best_lower_rank_update(adapter_dirs, tmp_path):
    source = Path(adapter_dirs["alpha"])  # rank 8, q and v, random A and B
    record = truncate(source, tmp_path / "r4", rank=4)
    assert (record["from_rank"], record["to_rank"]) == (8, 4)
    before, after = updates(source), updates(tmp_path / "r4")
    assert before.keys() == after.keys() and record["energy_kept"]["layers"] == len(before)
    for key, delta in before.items():
        singular = torch.linalg.svdvals(delta)
        best_error = singular[4:].square().sum().sqrt()  # Eckart–Young: the tail's norm
        error = (delta - after[key]).norm()
        assert error <= best_error + 0.01 * delta.norm()  # bfloat16 rounding
        assert torch.linalg.matrix_rank(after[key].double(), rtol=1e-3) <= 4
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4
    assert 0 < record["energy_kept"]["min"] <= record["energy_kept"]["median"] < 1


def test_peft_serves_the_truncated_adapter(adapter_dirs, base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "r6"
    truncate(Path(adapter_dirs["alpha"]), out, rank=6)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    ids = AutoTokenizer.from_pretrained(base_dir)("A joyless slog.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    module = model.base_model.model.model.layers[0].self_attn.q_proj
    assert module.lora_A["default"].weight.shape[0] == 6


def test_a_rank_not_below_the_adapters_is_refused(adapter_dirs, tmp_path):
    with pytest.raises(SystemExit, match="not below the adapter's rank 8"):
        truncate(Path(adapter_dirs["alpha"]), tmp_path / "same", rank=8)
