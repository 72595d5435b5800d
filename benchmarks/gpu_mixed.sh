#!/usr/bin/env bash
# Issue 4's comparison on a mixed-precision model: a generated 49B-parameter qwen3moe (40 layers, 128 experts of
# 1536, top 8) in llama.cpp's own Q4_K_M mix (benchmarks/mixes/qwen3moe-40-q4_k_m.txt: Q4_K, and Q6_K for the
# ffn_down of llama.cpp's "more bits" layers), 29.7 GB, on an emulated 24 GB card. benchmarks/placement_bench.py runs
# ccmoe against --fit, -ot exps=CPU and the --n-cpu-moe sweep, plus two attribution runs: the best --n-cpu-moe with
# ccmoe's CPU settings, and (when ccmoe chose llama.cpp's repacking CPU buffers) ccmoe's placement in pinned ones.
# Expects gpu_bench.sh's prepare call on the same warm machine (engine, PREGEN=49b, CAL_TYPES with q4_k,q6_k);
# works alone too. Results in $OUT.
source benchmarks/gpu_common.sh
DEADLINE_S=${DEADLINE_S:-570}
gpu_log gpu_mixed.log
gpu_setup

MODEL="$W/qwen3moe-49b-q4_k_m.gguf"
gpu_generate "$MODEL" 40 49 1536 benchmarks/mixes/qwen3moe-40-q4_k_m.txt
gpu_build_engine
gpu_generated
gpu_hold_memory

python3 benchmarks/placement_bench.py --model "$MODEL" --work "$W/mixed" --out "$OUT" --backend cuda \
  --deadline $(( T0 + DEADLINE_S )) --reps "${REPS:-5}" --calib-mb 800
RC=$?
cp "$W/mixed/placement.json" "$W/mixed/placement-pinned.json" "$W/mixed/host-profile.json" "$OUT/" 2>/dev/null
say "done (rc $RC)"
exit $RC
