# Shared set-up of the GPU jobs (sourced): work folders and log, Python path, the carried llama.cpp source,
# the CUDA engine build, and gpu_hold (emulate a smaller card). What they need from here travels in .carry/
# (benchmarks/gpu_carry.sh fills it; name it in the device call's carry).
set -uo pipefail
T0=$(date +%s)
FREE_MIB=${FREE_MIB:-24077}          # what llama.cpp's fit saw free on an RTX 4090 (tools/fit-params/README.md)
W=${WORK:-/root/ccmoe-gpu}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 CCMOE_CACHE_DIR="$W/cache" CCMOE_VENDOR_DIR="$W/llama.cpp"
say() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }

gpu_log() {          # everything the job prints also goes to $OUT/$1
  exec > >(tee -a "$OUT/$1") 2>&1
}
gpu_setup() {
  say "host: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM; $(nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader)"
  say "cpu: $(lscpu | grep -E '^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|NUMA node\(s\)|NUMA node[0-9] CPU)' | sed 's/  */ /g' | tr '\n' ';')"
  if [ ! -d /tmp/site/gguf ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/gguf-0.19.0-py3-none-any.whl || exit 1
  fi
  export PYTHONPATH="/tmp/site:$PWD"
  # The llama.cpp source (models/, docs/ and media/ left out: 12 MB) and a carried engine (46 MB) do not fit in one
  # 64 MiB carry together: with the engine parts alone, only the source's stamp is written, which names the commit
  # that the cached engine's key needs.
  if [ ! -f "$W/llama.cpp/.ccmoe-source.json" ]; then
    if [ -f .carry/llama.cpp.tar.gz ]; then
      tar xzf .carry/llama.cpp.tar.gz -C "$W" || exit 1
    elif [ -f .carry/engine-cuda.tar.xz.part-00 ]; then
      mkdir -p "$W/llama.cpp"; say "no llama.cpp source carried: the carried engine must run here"
    else
      say "carry .carry/llama.cpp.tar.gz (the vendored source) or a packed engine"; exit 1
    fi
    echo '{"package": "llama-cpp-python", "package_version": "0.3.36", "commit": "0c1e57098"}' > "$W/llama.cpp/.ccmoe-source.json"
  fi
}

gpu_engine_bin() {   # the built engine's bin/ (after gpu_build_engine)
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bin_dir"])' "$W/engine.json"
}

gpu_build_engine() {
  gpu_unpack_carried_engine
  say "engine build (CUDA, sm_90)"
  python3 -m ccmoe_runtime.cli engine build --backend cuda --cmake-flag=-DCMAKE_CUDA_ARCHITECTURES=90 -j 16 --json \
    > "$W/engine.json" || { say "engine build failed"; tail -30 "$W"/cache/build/*.log; exit 1; }
  say "engine ready: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["bin_dir"], d.get("build_seconds"))' "$W/engine.json")"
  gpu_pack_engine
}

# The CUDA build takes about 5 minutes of a session's 30. PACK_ENGINE=1 sends the published engine back in $OUT
# (xz, parts of 15 MiB, when it compresses to 45 MiB or less); copied into .carry/ here, a later session's
# gpu_build_engine unpacks it into the engine cache, and `engine build` finds it there under the same key. The
# build is native to the CPU it ran on, so a carried engine is kept only if it runs the bundled model on the CPU.
gpu_unpack_carried_engine() {
  local parts=(.carry/engine-cuda.tar.xz.part-*) bench dir
  [ -f "${parts[0]}" ] || return 0
  mkdir -p "$W/cache/engines"
  cat "${parts[@]}" | xz -dc | tar xvf - -C "$W/cache/engines" > "$W/carried-engine.list" \
    || { say "the carried engine did not unpack"; return 0; }
  dir=$(head -1 "$W/carried-engine.list" | cut -d/ -f1)
  bench="$W/cache/engines/$dir/bin/llama-bench"
  if "$bench" -m models/ccmoe-mini-moe-f16.gguf -ngl 0 -p 32 -n 4 -r 1 -o csv > "$W/carried-engine-check.log" 2>&1; then
    say "carried engine $dir runs here; the build below reuses it"
  else
    say "carried engine $dir does not run here ($(tail -1 "$W/carried-engine-check.log")); building"
    rm -rf "${W:?}/cache/engines/$dir"
  fi
}

gpu_pack_engine() {
  [ -n "${PACK_ENGINE:-}" ] || return 0
  local dir size
  dir=$(dirname "$(gpu_engine_bin)")
  tar cf - -C "$(dirname "$dir")" "$(basename "$dir")" | xz -T16 -6 > "$W/engine-cuda.tar.xz"
  size=$(stat -c %s "$W/engine-cuda.tar.xz")
  if [ "$size" -le $(( 45 * 1024 * 1024 )) ]; then
    split -b 15M -d "$W/engine-cuda.tar.xz" "$OUT/engine-cuda.tar.xz.part-"
    say "engine packed for carrying: $(( size / 1048576 )) MiB in $(ls "$OUT"/engine-cuda.tar.xz.part-* | wc -l) parts"
  else
    say "engine not packed: $(( size / 1048576 )) MiB compressed is more than a carry can take"
  fi
}

gpu_hold_memory() {
  say "holding GPU memory: $FREE_MIB MiB stay free"
  python3 benchmarks/gpu_hold.py --free-mib "$FREE_MIB" > "$W/hold.json" 2> "$W/hold.err" &
  HOLD_PID=$!
  trap 'kill $HOLD_PID 2>/dev/null' EXIT
  for _ in $(seq 1 120); do [ -s "$W/hold.json" ] && break; sleep 0.5; done
  cat "$W/hold.json" "$W/hold.err"; nvidia-smi --query-gpu=memory.used,memory.free --format=csv
}

# A generated Qwen3-30B-A3B-shaped qwen3moe (2048 wide, 128 experts, top 8) of N layers, written as Q8_0 in the
# background (the CUDA build runs meanwhile): gpu_generate MODEL LAYERS SEED [EXPERT_FF TYPES_FILE] (as often as
# needed); then gpu_generated. EXPERT_FF widens the experts (768 by default); TYPES_FILE gives per-tensor types
# (regex=type lines, e.g. llama.cpp's Q4_K_M mix from benchmarks/llama_mix.py).
GEN_PIDS=""
gpu_generate() {
  local model=$1 types=(--type q8_0)
  [ -n "${5:-}" ] && types=(--type q4_k --tensor-types "$5")
  if [ ! -f "$model" ]; then
    say "generating $model in the background"
    python3 -m ccmoe_runtime.synth "${types[@]}" -o "$model" --arch qwen3moe --name "$(basename "$model" .gguf)" \
      --n-embd 2048 --n-layer "$2" --n-head 32 --n-head-kv 4 --head-dim 128 --n-expert 128 --n-expert-used 8 \
      --n-ff-exp "${4:-768}" --vocab-size 512 --seed "$3" > "$model.log" 2>&1 &
    GEN_PIDS="$GEN_PIDS $!"
  fi
}

gpu_generated() {    # wait for every gpu_generate model
  for pid in $GEN_PIDS; do wait "$pid" || { cat "$W"/*.gguf.log; exit 1; }; done
  GEN_PIDS=""
  ls -la "$W"/*.gguf
}

# The bundled model's pp512 on the GPU (best of 30 repetitions) in 5 separate processes per way of running it:
# llama-bench's default threads, 8, 4 and 1 thread, no busy-waiting threads (--poll 0), and pinned to one CPU.
# Its pp512 lasts under 2 ms, so this is the host launching kernels; the spread between processes of one way says
# which way is steady.
gpu_launch_probe() {
  local bench bundled how cmd
  bench=$(gpu_engine_bin)/llama-bench
  bundled=$(python3 -c "from ccmoe_runtime.sources import bundled_model_path as p; print(p())")
  say "launch probe on $bundled: pp512, 5 processes each way, best of 30 repetitions"
  for how in "default" "-t 8" "-t 4" "-t 1" "--poll 0" "taskset -c 3"; do
    for _ in 1 2 3 4 5; do
      case $how in
        default) cmd=("$bench") ;;
        taskset*) read -ra cmd <<< "$how"; cmd+=("$bench") ;;
        *) read -ra cmd <<< "$bench $how" ;;
      esac
      "${cmd[@]}" -m "$bundled" -ngl 999 -p 512 -n 0 -r 30 -o json 2>/dev/null \
        | python3 -c 'import json,sys; print(round(max(json.load(sys.stdin)[0]["samples_ts"])))'
    done | tr '\n' ' ' | sed "s/^/  $how: /"; echo
  done
}

# Where a spread comes from (SPREAD_PROBE=1 in gpu_bench.sh), bounded to about 2 minutes. With the GPU's clocks, power
# and throttle reasons logged every 100 ms ($OUT/gpu-clocks.csv): each CPU's own speed (benchmarks/cpu_speeds.py),
# the bundled model's pp512 (best and median of each process, start time) in 12 processes back to back, pinned to
# the CPU a scan just found fastest and then slowest, 6 more with a 2 s idle gap before each, one process of 3,000
# repetitions read in chunks of 200 (does a process change speed?), and the 10B model's exps=CPU decode at 16 and 12
# threads in 3 processes each. Every line says when it ran, so process speeds can be set against the clocks.
gpu_spread_probe() {
  local bench bundled ten i t pick cpu
  bench=$(gpu_engine_bin)/llama-bench
  bundled=$(python3 -c "from ccmoe_runtime.sources import bundled_model_path as p; print(p())")
  ten="$W/qwen3moe-10b-q8_0.gguf"
  say "spread probe: steal $(awk '/^cpu /{print $9}' /proc/stat) jiffies since boot"
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,temperature.gpu,pstate \
    --format=csv,noheader -lms 100 > "$OUT/gpu-clocks.csv" 2>&1 &
  local smi=$!
  nvidia-smi --query-gpu=timestamp,clocks_event_reasons.active --format=csv,noheader -lms 100 > "$W/gpu-reasons.csv" 2>&1 &
  local smi2=$!
  summarize() { python3 benchmarks/bench_samples.py "$@"; }
  say "spread probe: each CPU's speed (Mloops/s), 5 scans"
  python3 benchmarks/cpu_speeds.py --scans 5 --pause 1
  say "spread probe: bundled pp512, 12 processes back to back"
  for i in $(seq 1 12); do "$bench" -m "$bundled" -ngl 999 -p 512 -n 0 -r 30 -o json 2>/dev/null | summarize "b2b#$i"; done
  say "spread probe: bundled pp512 pinned to the CPU a scan just found fastest, then slowest, 6 times each"
  for i in $(seq 1 6); do
    for pick in fastest slowest; do
      cpu=$(python3 benchmarks/cpu_speeds.py --pick $pick)
      taskset -c "$cpu" "$bench" -m "$bundled" -ngl 999 -p 512 -n 0 -r 30 -o json 2>/dev/null | summarize "$pick-cpu$cpu#$i"
    done
  done
  say "spread probe: bundled pp512+tg128 as bench runs it, 6 processes"
  for i in $(seq 1 6); do "$bench" -m "$bundled" -ngl 999 -p 512 -n 128 -r 20 -o json 2>/dev/null | summarize "bench#$i"; done
  say "spread probe: bundled pp512, 6 processes after 2 s idle"
  for i in $(seq 1 6); do sleep 2; "$bench" -m "$bundled" -ngl 999 -p 512 -n 0 -r 30 -o json 2>/dev/null | summarize "idle#$i"; done
  say "spread probe: one process, 3000 repetitions in chunks of 200"
  "$bench" -m "$bundled" -ngl 999 -p 512 -n 0 -r 3000 -o json 2>/dev/null | summarize long --chunks 200
  if [ -f "$ten" ]; then
    for t in 16 12; do
      say "spread probe: 10B exps=CPU tg32 at -t $t, 3 processes"
      for i in 1 2 3; do timeout 60 "$bench" -m "$ten" -ngl 999 -ot exps=CPU -t "$t" -p 0 -n 32 -r 2 -o json 2>/dev/null | summarize "10b-t$t#$i"; done
    done
  fi
  kill $smi $smi2 2>/dev/null
  sort "$W/gpu-reasons.csv" | cut -d, -f2 | uniq -c | sort -rn | head -5 | sed "s/^/  clock event reasons: /"
  grep -c . "$OUT/gpu-clocks.csv" | sed 's/^/  clock samples: /'
  say "spread probe done; steal: $(awk '/^cpu /{print $9}' /proc/stat) jiffies since boot"
}
