#!/usr/bin/env bash
# Train every task adapter on each base with one recipe — all in parallel processes on one GPU —
# then evaluate base vs fine-tuned on the full test splits through the engine (HF backend).
#   BASES="smollm2 gemma3-270m" STEPS=300 BATCH=16 LR=5e-4 OUT=/tmp/ft bash lab/gpu_finetune.sh
#   TASKS_smollm2=address  # per base: train only these tasks on SmolLM2
#   TASKS=address ARGS_address="--rank 16 --alpha 32 --targets q_proj k_proj v_proj o_proj \
#     gate_proj up_proj down_proj --steps 600" bash lab/gpu_finetune.sh   # one task, own recipe
# Expects the packaged GGUFs importable (PYTHONPATH), bitsandbytes, and the task splits in
# $LORALAND_DATA (python -m finetune.data). Writes logs, quality-BASE/ and adapters.tar to $OUT,
# then touches $OUT/DONE.
set -uo pipefail
OUT=${OUT:-out}
BASES=${BASES:-smollm2 gemma3-270m}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
config() { python3 -c "from finetune.train import default_layout; print(default_layout('$1')[1])"; }
for base in $BASES; do
  python3 -m engine.base_model "$base" > "$OUT/convert-$base.log" 2>&1
done
TASKS=${TASKS:-sentiment news spam address sql}
tasks_of() { local var="TASKS_${1//[^a-zA-Z0-9]/_}"; echo "${!var:-$TASKS}"; }
for base in $BASES; do
  for task in $(tasks_of "$base"); do
    extra="ARGS_$task"  # per-task overrides, the same for every base
    # shellcheck disable=SC2086
    python3 -m finetune.train --task "$task" --base "$base" --steps "${STEPS:-300}" \
      --batch-size "${BATCH:-16}" --lr "${LR:-5e-4}" --no-register ${!extra:-} \
      > "$OUT/train-$base-$task.log" 2>&1 &
  done
done
wait
for base in $BASES; do
  for task in $(tasks_of "$base"); do
    python3 -m finetune.train --task "$task" --base "$base" --register-only
  done
  # shellcheck disable=SC2086
  python3 -m finetune.evaluate --config "$(config "$base")" --tasks $(tasks_of "$base") --limit "${LIMIT:-2000}" \
    --batch 128 --update-registry --out "$OUT/quality-$base" > "$OUT/eval-$base.log" 2>&1 &
done
wait
tar cf "$OUT/adapters.tar" adapters adapters*.yaml
touch "$OUT/DONE"
