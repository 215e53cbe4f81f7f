"""A synthetic base model of a chosen shape with random weights, N random LoRA adapters, and an
adapters.yaml serving them — for speed tests at scale with no download.

    python -m loadtest.synth --shape mistral-7b --adapters 128 --rank 8 --out /tmp/synth7b
    python -m loadtest.synth --shape tiny --adapters 4 --out /tmp/synth-tiny      # CI-sized

Weights are real random bf16 safetensors (SGLang's ``load_format="dummy"`` cannot be combined
with LoRA adapters). The tokenizer is the packaged SmolLM2 one, so the vocabulary is 49152 rather
than Mistral's 32000 (+0.07B parameters). Speed, not quality, is what these measure.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHAPES = {
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128),
}  # fmt: skip
VOCAB = 49152


def module_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of a Llama/Mistral decoder layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    head = h // shape["num_attention_heads"]
    kv = head * shape["num_key_value_heads"]
    return {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }  # fmt: skip


def write_base(out: Path, shape_name: str, seed: int) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from engine.base_model import resolve_base

    shape = SHAPES[shape_name]
    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": VOCAB,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **shape,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    AutoTokenizer.from_pretrained(resolve_base("smollm2")).save_pretrained(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU draws 7B numbers in seconds
    gen = torch.Generator(device=device).manual_seed(seed)
    h = shape["hidden_size"]

    def rand(*size):
        return (torch.randn(*size, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    save_file({"model.embed_tokens.weight": rand(VOCAB, h), "model.norm.weight": torch.ones(
        h, dtype=torch.bfloat16), "lm_head.weight": rand(VOCAB, h)},
        str(out / "model-embed.safetensors"))  # fmt: skip
    index = {f"{k}": "model-embed.safetensors" for k in
             ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}  # fmt: skip
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    for layer in tqdm(range(shape["num_hidden_layers"]), desc="random layers"):
        tensors = {}
        for name, (fan_in, fan_out) in module_shapes(shape).items():
            block = "self_attn" if name in attention else "mlp"
            tensors[f"model.layers.{layer}.{block}.{name}.weight"] = rand(fan_out, fan_in)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{layer}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
        filename = f"model-layer{layer:03d}.safetensors"
        save_file(tensors, str(out / filename))
        index |= dict.fromkeys(tensors, filename)
    index_file = {"metadata": {}, "weight_map": index}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=1))


def write_adapter(out: Path, shape: dict, rank: int, targets: list[str], seed: int) -> None:
    """A peft-format LoRA with random A and B on every layer's target modules."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(shape)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for name in targets:
            fan_in, fan_out = shapes[name]
            block = (
                "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            )
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            a = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=gen) / rank**0.5 * 0.1
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": "synthetic", "modules_to_save": None,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))


def write_registry(out: Path, names: list[str]) -> None:
    import yaml

    registry = {
        "base": {"model": "base", "name": f"synthetic-{out.name}", "chat_template": True},
        "engine": {"backend": "auto"},
        "adapters": [
            {"name": n, "path": f"adapters/{n}", "task": "synthetic", "category": "synthetic",
             "description": "Random rank-r LoRA for speed tests.", "template": "{input}",
             "generation": {"max_tokens": 128}}
            for n in names
        ],
    }  # fmt: skip
    (out / "adapters.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))


def main() -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="mistral-7b")
    parser.add_argument("--adapters", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite an existing folder")
    args = parser.parse_args()
    if args.force:
        shutil.rmtree(args.out, ignore_errors=True)
    if not (args.out / "base" / "config.json").exists():
        write_base(args.out / "base", args.shape, args.seed)
    names = [f"lora-{i:03d}" for i in range(args.adapters)]
    for i, name in enumerate(tqdm(names, desc="random adapters")):
        write_adapter(args.out / "adapters" / name, SHAPES[args.shape], args.rank, args.targets,
                      args.seed + 1 + i)  # fmt: skip
    write_registry(args.out, names)
    print(f"{args.out}: base ({args.shape}), {len(names)} rank-{args.rank} adapters, adapters.yaml")


if __name__ == "__main__":
    main()
