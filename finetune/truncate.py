"""A LoRA adapter at a lower rank: each layer's update ΔW = B·A·(alpha/r) replaced by its best
rank-k approximation (truncated SVD), so a higher-rank training run ships at a smaller size.

    python -m finetune.truncate out/sql-r64 adapters/smollm2/sql --rank 32

The new adapter has ``r = lora_alpha = k`` (scaling 1, the old scaling folded into B), bfloat16
weights like ``finetune.train``'s, the source's ``training.json`` with a ``truncated`` record
(ranks, and the share of each layer's squared singular values kept: 1.0 is exact).
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
    """(A', B', energy kept) with B'·A' the best rank-``rank`` approximation of B·A·scale."""
    u, s, vh = torch.linalg.svd((b.float() @ a.float()) * scale, full_matrices=False)
    root = s[:rank].sqrt()
    kept = float((s[:rank] ** 2).sum() / (s**2).sum()) if s.any() else 1.0
    return (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root).contiguous(), kept


def truncate(source: Path, out: Path, rank: int) -> dict:
    config = json.loads((source / CONFIG).read_text())
    if rank >= config["r"]:
        raise SystemExit(f"--rank {rank} is not below the adapter's rank {config['r']}")
    if config.get("use_rslora") or config.get("alpha_pattern") or config.get("rank_pattern"):
        raise SystemExit("rsLoRA and per-layer ranks or alphas are not supported")
    scale = config["lora_alpha"] / config["r"]
    weights, new, kept = load_file(source / WEIGHTS), {}, []
    for key_a in sorted(k for k in weights if ".lora_A." in k):
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        a, b, energy = truncated_pair(weights[key_a], weights[key_b], scale, rank)
        new[key_a], new[key_b] = a.to(torch.bfloat16), b.to(torch.bfloat16)
        kept.append(energy)
    if len(new) != len(weights):
        raise SystemExit(f"{source / WEIGHTS} holds weights other than LoRA A/B pairs")
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
    for extra in ("NOTICE",):
        if (source / extra).is_file():
            shutil.copy(source / extra, out / extra)
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
