#!/usr/bin/env bash
# One H200 session of the `device` tool: fine-tuning on both bases, SGLang parity, and the 7B
# engine benchmarks (soak, sweep, evicted-adapter reload, peft baseline), run in the background
# so they survive between calls while the machine stays warm.
#
#   bash scripts/h200.sh stash      # each call: keep what it carried (.gpu/part*, .gpu/c*) in /tmp
#   bash scripts/h200.sh start      # unpack runtime + payload, launch the jobs (returns at once)
#   bash scripts/h200.sh collect    # copy logs and results to $OUT; print progress
#
# The payload (.gpu/c*/p*, split to fit the per-call transfer limit) is a tar of the two base
# GGUFs, the bitsandbytes wheel and the task splits. Jobs run from a copy of the repo in
# /tmp/repo, because each call re-syncs the working tree.
set -uo pipefail
ACTION=${1:?stash | start | collect}
STASH=/tmp/stash
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
  (cd /tmp && sha256sum -c "$STASH/c8/sum.txt") || exit 1
  tar xf /tmp/payload.tar -C /tmp
  for whl in /tmp/payload/whl/*.whl; do python3 -m zipfile -e "$whl" /tmp/bnb; done
  mkdir -p /tmp/cache/gguf && cp /tmp/payload/gguf/gemma-3-270m-q4_k_m.gguf /tmp/cache/gguf/
  rm -rf /tmp/repo && mkdir /tmp/repo && cp -r . /tmp/repo && rm -rf /tmp/repo/.gpu
}

finetune_then_parity() {
  cd /tmp/repo
  OUT=/tmp/ft bash scripts/gpu_finetune.sh
  python3 -m finetune.evaluate --backend sglang --dtype float16 --limit 300 --batch 512 \
    --set mem_fraction_static=0.1 --set cuda_graph=false --out /tmp/ft/parity-sglang \
    > /tmp/ft/parity-sglang.log 2>&1
  touch /tmp/ft/ALLDONE
}

benchmarks() {
  cd /tmp/repo
  python3 -m loadtest.synth --shape mistral-7b --adapters 136 --rank 8 --out /tmp/synth7b \
    > /tmp/bench-synth.log 2>&1
  python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out /tmp/bench \
    --plan soak,sweep,evict --adapters 1,8,32,64,128 --users 32,128,256 \
    --duration "${DURATION:-12}" --warmup 2 --soak-seconds "${SOAK:-360}" \
    --spare-adapter /tmp/synth7b/adapters/lora-135 --evict-rounds 3 --wait-for /tmp/ft/ALLDONE \
    --set max_loras_per_batch=128 --set mem_fraction_static=0.6 > /tmp/bench.log 2>&1
  python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out /tmp/peft --backend hf \
    --dtype bfloat16 --set max_batch_size=256 --plan sweep --adapters 1,8 --users 32 --keep 8 \
    --duration "${PEFT_DURATION:-45}" --warmup 2 > /tmp/peft.log 2>&1
  touch /tmp/bench-ALLDONE
}

collect() {
  mkdir -p "$OUT"
  [ -d /tmp/ft ] && tar czf "$OUT/ft.tgz" -C /tmp ft
  (cd /tmp && tar czf "$OUT/bench.tgz" $(ls -d bench peft ./*.log 2>/dev/null))
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  ls /tmp/ft 2>/dev/null | tr '\n' ' '; echo
  for log in /tmp/bench.log /tmp/peft.log; do
    [ -f "$log" ] && { echo "== $log"; tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -6 | cut -c1-300; }
  done
  [ -f /tmp/bench-ALLDONE ] && echo "BENCH ALL DONE"
  [ -f /tmp/ft/ALLDONE ] && echo "FT ALL DONE"
}

case "$ACTION" in
  stash) stash ;;
  start)
    stash
    unpack
    (cd /tmp/repo && python3 -m engine.base_model smollm2 2>&1 | tail -1)  # before both jobs use it
    setsid nohup bash "$0" finetune > /tmp/ft-driver.log 2>&1 < /dev/null &
    setsid nohup bash "$0" benchmarks > /tmp/bench-driver.log 2>&1 < /dev/null &
    sleep 20
    collect
    ;;
  finetune) finetune_then_parity ;;
  benchmarks) benchmarks ;;
  restart-benchmarks)
    rm -f /tmp/bench-ALLDONE
    setsid nohup bash "$0" benchmarks > /tmp/bench-driver.log 2>&1 < /dev/null &
    sleep 5
    ;;
  collect) collect ;;
esac
