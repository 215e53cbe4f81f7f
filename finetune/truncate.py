"""A LoRA adapter at a lower rank: each layer's update ΔW = B·A·(alpha/r) replaced by its best
rank-k approximation (truncated SVD), so a higher-rank training run ships at a smaller size.

    python -m finetune.truncate out/sql-r64 adapters/smollm2/sql --rank 32

The new adapter has ``r = lora_alpha = k`` (scaling 1, the old scaling folded into B), bfloat16
weights like ``finetune.train``'s, the source's ``training.json`` with a ``truncated`` record
(ranks, and the share of each layer's squared singular values kept: 1.0 loses nothing but the
bfloat16 rounding). Plain LoRA only: DoRA, rsLoRA, per-layer ranks, biases and
``modules_to_save`` are refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS, CONFIG, TRAINING = "adapter_model.safetensors", "adapter_config.json", "training.json"


def truncated_pair(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int):
    """(A', B', energy kept) with B'·A' the best rank-``rank`` approximation of B·A·scale.

    The SVD of the r × r core of QR factors, not of the out × in update: the same factors at
    O((out + in)·r²) (a 7B model's 14336 × 4096 layers included)."""
    qb, rb = torch.linalg.qr(b.float())
    qa, ra = torch.linalg.qr(a.float().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T * scale, full_matrices=False)
    u, vh = qb @ u, vh @ qa.T
    kept = float((s[:rank] ** 2).sum() / (s**2).sum()) if s.any() else 1.0
    root = s[:rank].sqrt()
    new_a, new_b = root[:, None] * vh[:rank], u[:, :rank] * root
    short = rank - len(root)  # a layer narrower than the new rank: zero rows, same shapes
    if short > 0:
        new_a = torch.cat([new_a, new_a.new_zeros(short, new_a.shape[1])])
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], short)], dim=1)
    return new_a.contiguous(), new_b.contiguous(), kept


UNSUPPORTED = {
    "use_dora": "DoRA (its magnitude vectors depend on the rank's update)",
    "use_rslora": "rsLoRA",
    "alpha_pattern": "per-layer alphas",
    "rank_pattern": "per-layer ranks",
    "modules_to_save": "modules_to_save (whole weights, not LoRA pairs)",
    "lora_bias": "lora_bias",
}


def refusal(config: dict, rank: int) -> str | None:
    if not 0 < rank < config["r"]:
        return f"--rank {rank}: the new rank must be in 1 … {config['r'] - 1} (below the adapter's)"
    if config.get("bias", "none") != "none":
        return f"bias={config['bias']!r} is not supported (only bias='none')"
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            return f"{what} is not supported ({key} is set)"
    return None


def truncate(source: Path, out: Path, rank: int) -> dict:
    config = json.loads((source / CONFIG).read_text())
    if (why := refusal(config, rank)) is not None:
        raise SystemExit(why)
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(source / WEIGHTS)
    pairs = {k: k.replace(".lora_A.", ".lora_B.") for k in weights if ".lora_A.weight" in k}
    if set(weights) != set(pairs) | set(pairs.values()):
        odd = sorted(set(weights) - set(pairs) - set(pairs.values()))[:3]
        raise SystemExit(f"{source / WEIGHTS} holds more than LoRA A/B pairs: {odd} ...")
    new, kept = {}, []
    for key_a, key_b in sorted(pairs.items()):
        a, b, energy = truncated_pair(weights[key_a], weights[key_b], scale, rank)
        new[key_a], new[key_b] = a.to(torch.bfloat16), b.to(torch.bfloat16)
        kept.append(energy)
    out.mkdir(parents=True, exist_ok=True)
    save_file(new, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps({**config, "r": rank, "lora_alpha": rank}, indent=2))
    record = {
        "from_rank": config["r"],
        "to_rank": rank,
        "method": "truncated SVD of each layer's update (finetune/truncate.py)",
        "energy_kept": {"min": min(kept), "median": statistics.median(kept), "layers": len(kept)},
    }
    if (source / TRAINING).is_file():
        training = json.loads((source / TRAINING).read_text())
        (out / TRAINING).write_text(json.dumps({**training, "truncated": record}, indent=1))
    if (source / "NOTICE").is_file():  # the base model's licence notice (finetune.train)
        shutil.copy(source / "NOTICE", out / "NOTICE")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a peft LoRA adapter folder")
    parser.add_argument("out", type=Path, help="where the truncated adapter goes")
    parser.add_argument("--rank", type=int, required=True, help="the new rank (below the old)")
    args = parser.parse_args()
    record = truncate(args.source, args.out, args.rank)
    energy = record["energy_kept"]
    print(
        f"rank {record['from_rank']} → {record['to_rank']} over {energy['layers']} layers; "
        f"energy kept: min {energy['min']:.4f}, median {energy['median']:.4f} → {args.out}"
    )


if __name__ == "__main__":
    main()
