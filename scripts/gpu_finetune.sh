#!/usr/bin/env bash
# Train every task adapter on each base with one recipe — all in parallel processes on one GPU —
# then evaluate base vs fine-tuned on the full test splits through the engine (HF backend).
#   BASES="smollm2 gemma3-270m" STEPS=300 BATCH=16 LR=5e-4 OUT=/tmp/ft bash scripts/gpu_finetune.sh
# Expects the packaged GGUFs importable (PYTHONPATH), bitsandbytes, and the task splits in
# $LORALAND_DATA (python -m finetune.data). Writes logs, quality-BASE/ and adapters.tar to $OUT,
# then touches $OUT/DONE.
set -uo pipefail
OUT=${OUT:-out}
BASES=${BASES:-smollm2 gemma3-270m}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
config() { if [ "$1" = smollm2 ]; then echo adapters.yaml; else echo "adapters-$1.yaml"; fi; }
for base in $BASES; do
  python3 -m engine.base_model "$base" > "$OUT/convert-$base.log" 2>&1
done
for base in $BASES; do
  for task in sentiment news spam address sql; do
    python3 -m finetune.train --task "$task" --base "$base" --steps "${STEPS:-300}" \
      --batch-size "${BATCH:-16}" --lr "${LR:-5e-4}" --no-register \
      > "$OUT/train-$base-$task.log" 2>&1 &
  done
done
wait
for base in $BASES; do
  python3 -m finetune.train --task all --base "$base" --register-only
  python3 -m finetune.evaluate --config "$(config "$base")" --limit "${LIMIT:-2000}" --batch 128 \
    --update-registry --out "$OUT/quality-$base" > "$OUT/eval-$base.log" 2>&1 &
done
wait
tar cf "$OUT/adapters.tar" adapters adapters*.yaml
touch "$OUT/DONE"
