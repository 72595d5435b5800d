#!/usr/bin/env bash
# ccmoe vs the best --n-cpu-moe at several emulated card sizes (benchmarks/card_sizes.py) on the device machine.
# SIZES (MiB left free) default to the RTX 4090's 24,077 and three more a quarter of a 30B layer's experts apart
# (153 MiB), so that the edge of the free memory falls at four evenly spaced points inside a layer.
# Call 1: PREPARE_ONLY=1 (engine build, the 30B model, calibration); then, within 30 s on the warm machine, calls
# without it until every size is done (each stops before DEADLINE_S; finished sizes are kept). PIN_PROBE=1 adds
# gpu_launch_probe to the prepare call.
source benchmarks/gpu_common.sh
DEADLINE_S=${DEADLINE_S:-560}
SIZES=${SIZES:-24077 23924 23771 23618}
gpu_log gpu_card_sizes.log
gpu_setup

MODEL="$W/qwen3moe-30b-q8_0.gguf"
gpu_generate "$MODEL" 48 30
gpu_build_engine
gpu_generated

HOST_PROFILE=$(python3 -c "from ccmoe_runtime.costmodel import host_profile_path as p; from ccmoe_runtime.devices import get_profile as g; print(p(g('auto')))")
if [ ! -f "$HOST_PROFILE" ]; then
  gpu_hold_memory
  say "calibrating"
  python3 -m ccmoe_runtime.cli calibrate --device auto --size-mb 800 --json > "$OUT/host-profile.json" || say "calibrate failed"
  kill "$HOLD_PID"; wait "$HOLD_PID" 2>/dev/null; trap - EXIT
fi
cp "$HOST_PROFILE" "$OUT/host-profile.json" 2>/dev/null
[ -n "${PIN_PROBE:-}" ] && gpu_launch_probe          # issue 5's bundled-model pp spread (about 70 s)
[ -n "${PREPARE_ONLY:-}" ] && { say "prepared (engine, model, host profile); PREPARE_ONLY set"; exit 0; }

# shellcheck disable=SC2086
python3 benchmarks/card_sizes.py --model "$MODEL" --free-mib $SIZES --work "$W/card-sizes" --out "$OUT" \
  --rounds "${ROUNDS:-3}" --reps "${REPS:-3}" --deadline $(( T0 + DEADLINE_S ))
RC=$?
say "done (rc $RC)"
exit $RC
