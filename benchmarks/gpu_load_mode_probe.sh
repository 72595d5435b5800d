#!/usr/bin/env bash
# Does llama.cpp's load mode change hybrid decode? `--n-cpu-moe 12` on the 30B model at 24,077 MiB free, mmap
# (llama.cpp's default) against `-lm none` (pinned host buffers, ccmoe's calibrated choice on the H100), in
# alternating rounds of llama-bench -r 3. Each result line is printed as it comes (a time-boxed call keeps them).
source benchmarks/gpu_common.sh
gpu_log gpu_load_mode_probe.log
gpu_setup
MODEL="$W/qwen3moe-30b-q8_0.gguf"
gpu_generate "$MODEL" 48 30
gpu_build_engine
gpu_generated
gpu_hold_memory
BENCH=$(gpu_engine_bin)/llama-bench
for round in $(seq 1 "${ROUNDS:-3}"); do
  for mode in mmap none; do
    extra=(); [ "$mode" = none ] && extra=(-lm none)
    "$BENCH" -m "$MODEL" -ncmoe "${NCMOE:-12}" -t 16 "${extra[@]}" -p 512 -n 128 -r 3 -o json 2>/dev/null \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); print(" ".join(("pp" if x["n_prompt"] else "tg") + " %.2f" % max(x["samples_ts"]) for x in r))' \
      | sed "s/^/[round $round] ncmoe=${NCMOE:-12} $mode: /"
  done
done
say "done"
