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


@pytest.mark.parametrize("rank", [8, 0, -1])
def test_a_rank_outside_one_to_below_the_adapters_is_refused(adapter_dirs, tmp_path, rank):
    with pytest.raises(SystemExit, match=r"must be in 1 … 7"):
        truncate(Path(adapter_dirs["alpha"]), tmp_path / "out", rank=rank)
    assert not (tmp_path / "out").exists()


def test_dora_and_extra_weights_are_refused(base_dir, tmp_path):
    from helpers import make_peft_adapter

    dora = make_peft_adapter(base_dir, tmp_path / "dora", 4, ["q_proj"], 3, [0], use_dora=True)
    with pytest.raises(SystemExit, match="DoRA"):
        truncate(Path(dora), tmp_path / "d2", rank=2)
    saved = make_peft_adapter(
        base_dir, tmp_path / "saved", 4, ["q_proj"], 3, [0], modules_to_save=["lm_head"]
    )
    with pytest.raises(SystemExit, match="modules_to_save"):
        truncate(Path(saved), tmp_path / "s2", rank=2)


def test_a_layer_narrower_than_the_rank_keeps_the_rank_in_zero_rows(tmp_path):
    from finetune.truncate import truncated_pair

    a, b = torch.randn(8, 3), torch.randn(5, 8)  # an update of rank ≤ 3 at r = 8
    new_a, new_b, kept = truncated_pair(a, b, 2.0, rank=4)
    assert new_a.shape == (4, 3) and new_b.shape == (5, 4) and kept == pytest.approx(1.0)
    assert torch.allclose(new_b @ new_a, b @ a * 2.0, atol=1e-4)
