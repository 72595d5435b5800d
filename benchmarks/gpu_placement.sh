#!/usr/bin/env bash
# The whole GPU acceptance job for the device machine (run from the repository root; results in $OUT):
# unpack the carried llama.cpp source, build the CUDA engine, generate a Qwen3-30B-A3B-shaped qwen3moe in Q8_0
# (~32 GB, written as random blocks while the engine builds), hold GPU memory so that a 24 GB card is emulated,
# calibrate, and run benchmarks/placement_bench.py (ccmoe vs --fit, -ot exps=CPU, --n-cpu-moe sweep).
# Resumable: a second run on the same (warm) machine skips what is done. DEADLINE_S bounds one run.
source benchmarks/gpu_common.sh
DEADLINE_S=${DEADLINE_S:-570}
gpu_log gpu_placement.log
gpu_setup

MODEL="$W/qwen3moe-30b-q8_0.gguf"
gpu_generate "$MODEL" 48 30
[ -n "${ALSO_10B:-}" ] && gpu_generate "$W/qwen3moe-10b-q8_0.gguf" 16 10     # for gpu_bench.sh, next call

gpu_build_engine
gpu_generated

gpu_hold_memory

python3 benchmarks/placement_bench.py --model "$MODEL" --work "$W" --out "$OUT" --backend cuda \
  --deadline $(( T0 + DEADLINE_S )) --reps "${REPS:-3}"
RC=$?
cp "$W/placement.json" "$W/host-profile.json" "$OUT/" 2>/dev/null
say "done (rc $RC)"
exit $RC
