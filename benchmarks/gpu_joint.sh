#!/usr/bin/env bash
# The GPU acceptance run of issue 18 on a bare GPU machine (benchmarks/gpu_joint.py says what it measures), in two
# calls that follow each other while the machine stays warm (files stay in $W between them):
#   bash benchmarks/gpu_joint.sh prepare   # CUDA engine build || Q8_0 source; Q4_K_M; measurements
#   bash benchmarks/gpu_joint.sh bench     # per card fraction: hold, compress, contenders; results to $OUT
# What it needs from the machine that sends it travels in .carry-place/ (git-ignored): llama.cpp.tar.gz (the
# vendored source without models/, docs/, media/) and whl/ (wheels of the Python packages a bare image may lack:
# gguf, click, psutil, matplotlib and its dependencies), made with:
#   tar czf .carry-place/llama.cpp.tar.gz -C vendor --exclude=llama.cpp/{models,docs,media,.git} llama.cpp
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .carry-place/whl gguf==0.19.0 click psutil matplotlib contourpy cycler fonttools kiwisolver pyparsing ...
# Environment: W (work folder, default /root/gj), OUT (results), DEADLINE_S (bench: stop starting work after it),
# FRACTIONS (default 0.6,0.8), ROUNDS (2), REQUESTS (2).
set -uo pipefail
W=${W:-/root/gj}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 CCMOE_CACHE_DIR="$W/cache" CCMOE_VENDOR_DIR="$W/llama.cpp"
say() { echo "[$(date +%H:%M:%S)] $*"; }

site() {   # carried wheels, only for the modules this image lacks
  local whl mod
  for whl in .carry-place/whl/*.whl; do
    mod=$(basename "$whl" | cut -d- -f1)
    case $mod in python_dateutil) mod=dateutil ;; fonttools) mod=fontTools ;; esac
    python3 -c "import $mod" 2>/dev/null && continue
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$whl" || exit 1
  done
  export PYTHONPATH="$PWD:/tmp/site"
}

source_tree() {
  [ -f "$W/llama.cpp/.ccmoe-source.json" ] && return 0
  tar xzf .carry-place/llama.cpp.tar.gz -C "$W" || exit 1
  echo '{"package": "llama-cpp-python", "package_version": "0.3.36", "commit": "0c1e57098"}' \
    > "$W/llama.cpp/.ccmoe-source.json"
}

site
say "host: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(nvidia-smi --query-gpu=name,memory.total,memory.free,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader); disk $(df -h "$W" | awk 'NR==2{print $4}') free"
case ${1:-} in
  prepare)
    source_tree
    if [ ! -s "$W/engine.json" ]; then
      say "engine build (CUDA sm_90, CPU native-no-amx) in the background"
      python3 -m ccmoe_runtime.cli engine build --backend cuda --cpu native-no-amx \
        --cmake-flag=-DCMAKE_CUDA_ARCHITECTURES=90 -j "$(nproc)" --json > "$W/engine.json" 2> "$W/engine.err" &
      BUILD=$!
    fi
    python3 benchmarks/gpu_joint.py generate --work "$W" || exit 1
    if [ -n "${BUILD:-}" ]; then
      wait "$BUILD" || { say "engine build failed"; tail -40 "$W/engine.err"; tail -40 "$W"/cache/build/*.log; exit 1; }
      say "engine: $(head -c 600 "$W/engine.json")"
    fi
    python3 benchmarks/gpu_joint.py prepare --work "$W" ;;
  bench)
    python3 benchmarks/gpu_joint.py bench --work "$W" --out "$OUT" --fractions "${FRACTIONS:-0.6,0.8}" \
      --rounds "${ROUNDS:-2}" --requests "${REQUESTS:-2}" --deadline-s "${DEADLINE_S:-3600}" ;;
  *) echo "usage: bash benchmarks/gpu_joint.sh prepare|bench" >&2; exit 2 ;;
esac
