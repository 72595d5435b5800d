#!/usr/bin/env bash
# `ccmoe-run bench` on the GPU machine (issue 5's acceptance): the bundled model and a generated ~10B-parameter
# qwen3moe (Q8_0, 10.6 GB), 5 alternating rounds each, with the GPU held so that a 24 GB card is emulated.
# Run from the repository root on the device machine; results in $OUT (bench JSON, history, log).
# MODELS picks what is benched (default "bundled 10b"; "30b" is the Qwen3-30B-A3B-shaped model of
# gpu_placement.sh, i.e. issue 4's comparison with alternating rounds); MIN_ROUND_S passes --min-round-s, THREADS -t.
# A call is limited to 600 s: PREPARE_ONLY=1 stops after the build, the models and calibration, so that a second
# call on the still-warm machine (within 30 s) spends its time on the bench alone. PREGEN names models to generate now
# for a later call (e.g. PREGEN="10b 30b" while MODELS=bundled); "49b" is a 40-layer qwen3moe with 1536-wide experts in
# llama.cpp's own Q4_K_M mix (29.7 GB; gpu_mixed.sh). CAL_TYPES sets calibrate --types. PIN_PROBE=1 adds gpu_launch_probe (gpu_common.sh): the
# bundled model's pp512 in separate processes at several thread counts and pinned, to tell where its spread comes from;
# SPREAD_PROBE=1 adds gpu_spread_probe (the GPU's clocks beside process speeds, and exps=CPU's decode by threads).
source benchmarks/gpu_common.sh
gpu_log gpu_bench.log
gpu_setup

MODELS=${MODELS:-bundled 10b}
for m in $MODELS ${PREGEN:-}; do
  case $m in
    10b) gpu_generate "$W/qwen3moe-10b-q8_0.gguf" 16 10 ;;
    30b) gpu_generate "$W/qwen3moe-30b-q8_0.gguf" 48 30 ;;
    49b) gpu_generate "$W/qwen3moe-49b-q4_k_m.gguf" 40 49 1536 benchmarks/mixes/qwen3moe-40-q4_k_m.txt ;;
  esac
done

gpu_build_engine
gpu_generated
gpu_hold_memory

HOST_PROFILE=$(python3 -c "from ccmoe_runtime.costmodel import host_profile_path as p; from ccmoe_runtime.devices import get_profile as g; print(p(g('auto')))")
if [ ! -f "$HOST_PROFILE" ] && [ -f .carry/host-profile.json ]; then    # an earlier call's calibration of this kind
  python3 - "$HOST_PROFILE" <<'PY' && say "host profile carried from an earlier call (same CPU, cores and GPU)"
import json, pathlib, shutil, sys
from ccmoe_runtime.costmodel import host_fingerprint
carried = pathlib.Path(".carry/host-profile.json")
if json.loads(carried.read_text()).get("host") != host_fingerprint():
    sys.exit(1)
pathlib.Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
shutil.copy(carried, sys.argv[1])
PY
fi
if [ -f "$HOST_PROFILE" ]; then
  say "host profile from an earlier calibration: $HOST_PROFILE"; cp "$HOST_PROFILE" "$OUT/host-profile.json"
else
  say "calibrating"
  python3 -m ccmoe_runtime.cli calibrate --device auto --size-mb 800 ${CAL_TYPES:+--types "$CAL_TYPES"} --json \
    > "$OUT/host-profile.json" || say "calibrate failed"
fi
[ -f "$HOST_PROFILE" ] && cp "$HOST_PROFILE" "$OUT/host-profile-saved.json"   # as saved: .carry/host-profile.json next time
[ -n "${PIN_PROBE:-}" ] && gpu_launch_probe
[ -n "${SPREAD_PROBE:-}" ] && gpu_spread_probe
[ -n "${PREPARE_ONLY:-}" ] && { say "prepared (engine, models, host profile); PREPARE_ONLY set, no bench"; exit 0; }
for m in $MODELS; do
  case $m in 10b|30b) m="$W/qwen3moe-$m-q8_0.gguf" ;; 49b) m="$W/qwen3moe-49b-q4_k_m.gguf" ;; esac
  name=$(basename "$m" .gguf)
  say "bench $name"
  python3 -m ccmoe_runtime.cli bench --device auto --model "$m" --runs "${RUNS:-5}" --min-round-s "${MIN_ROUND_S:-5}" \
    ${THREADS:+-t "$THREADS"} --history "$OUT/history.jsonl" --json > "$OUT/bench-$name.json" || say "bench $name failed"
  if [ -n "${SELF_CHECK:-}" ]; then      # one more round against the medians just measured
    python3 -m ccmoe_runtime.cli bench --device auto --model "$m" --runs 1 --no-history \
      --baseline "$OUT/bench-$name.json" --max-regression 5 > /dev/null 2>&1; echo "regression check vs itself: exit $?"
  fi
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("bench-*.json")):
    d = json.loads(f.read_text())
    print(f.name)
    for n, c in d["contenders"].items():
        if "error" in c:
            print(f"  {n}: failed {c['error'][:100]}"); continue
        print(f"  {n:<16} pp {c['pp']['median']:>10.1f} spread {c['pp']['spread']:.3f}  tg {c['tg']['median']:>8.1f} "
              f"spread {c['tg']['spread']:.3f}  rss {c['peak_rss_bytes']/1e9:.2f} GB  {c.get('predicted', '')}")
PY
say "done"
