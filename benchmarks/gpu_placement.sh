#!/usr/bin/env bash
# The whole GPU acceptance job for the device machine (run from the repository root; results in $OUT):
# unpack the carried llama.cpp source, build the CUDA engine, generate a Qwen3-30B-A3B-shaped qwen3moe in Q8_0
# (~32 GB, written as random blocks while the engine builds), hold GPU memory so that a 24 GB card is emulated,
# calibrate, and run benchmarks/placement_bench.py (ccmoe vs --fit, -ot exps=CPU, --n-cpu-moe sweep).
# Resumable: a second run on the same (warm) machine skips what is done. DEADLINE_S bounds one run.
set -uo pipefail
T0=$(date +%s)
DEADLINE_S=${DEADLINE_S:-570}
FREE_MIB=${FREE_MIB:-24077}          # what llama.cpp's fit saw free on an RTX 4090 (tools/fit-params/README.md)
W=${WORK:-/root/ccmoe-gpu}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
exec > >(tee -a "$OUT/gpu_placement.log") 2>&1
export PYTHONUNBUFFERED=1 CCMOE_CACHE_DIR="$W/cache" CCMOE_VENDOR_DIR="$W/llama.cpp"
say() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }

say "host: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM; $(nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader)"
if [ ! -d /tmp/site/gguf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/gguf-0.19.0-py3-none-any.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD"
if [ ! -f "$W/llama.cpp/.ccmoe-source.json" ]; then
  tar xzf .carry/llama.cpp.tar.gz -C "$W" || exit 1
  echo '{"package": "llama-cpp-python", "package_version": "0.3.36", "commit": "0c1e57098"}' > "$W/llama.cpp/.ccmoe-source.json"
fi

MODEL="$W/qwen3moe-30b-q8_0.gguf"
GEN_PID=""
if [ ! -f "$MODEL" ]; then
  say "generating $MODEL in the background"
  python3 -m ccmoe_runtime.synth --type q8_0 -o "$MODEL" --arch qwen3moe --name synth-qwen3moe-30b \
    --n-embd 2048 --n-layer 48 --n-head 32 --n-head-kv 4 --head-dim 128 --n-expert 128 --n-expert-used 8 \
    --n-ff-exp 768 --vocab-size 512 --seed 30 > "$W/gen.log" 2>&1 &
  GEN_PID=$!
fi

say "engine build (CUDA, sm_90)"
python3 -m ccmoe_runtime.cli engine build --backend cuda --cmake-flag=-DCMAKE_CUDA_ARCHITECTURES=90 -j 16 --json \
  > "$W/engine.json" || { say "engine build failed"; tail -30 "$W"/cache/build/*.log; exit 1; }
say "engine ready: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["bin_dir"], d.get("build_seconds"))' "$W/engine.json")"
if [ -n "$GEN_PID" ]; then wait "$GEN_PID" || { cat "$W/gen.log"; exit 1; }; fi
cat "$W/gen.log"; ls -la "$MODEL"

say "holding GPU memory: $FREE_MIB MiB stay free"
python3 benchmarks/gpu_hold.py --free-mib "$FREE_MIB" > "$W/hold.json" 2> "$W/hold.err" &
HOLD_PID=$!
trap 'kill $HOLD_PID 2>/dev/null' EXIT
for _ in $(seq 1 120); do [ -s "$W/hold.json" ] && break; sleep 0.5; done
cat "$W/hold.json" "$W/hold.err"; nvidia-smi --query-gpu=memory.used,memory.free --format=csv

python3 benchmarks/placement_bench.py --model "$MODEL" --work "$W" --out "$OUT" --backend cuda \
  --deadline $(( T0 + DEADLINE_S )) --reps "${REPS:-3}"
RC=$?
cp "$W/placement.json" "$W/host-profile.json" "$OUT/" 2>/dev/null
say "done (rc $RC)"
exit $RC
