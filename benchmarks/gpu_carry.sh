#!/usr/bin/env bash
# Fill .carry/ (git-ignored) for the GPU jobs, here, before the first device call: the gguf wheel and the vendored
# llama.cpp source without models/, docs/ and media/ (12 MB). Given the folder of an earlier call's files
# (PACK_ENGINE=1's engine-cuda.tar.xz.part-* and host-profile-saved.json), it carries those instead of the source:
# the packed engine is 46 MB, and source and engine together exceed a call's 64 MiB.
#   bash benchmarks/gpu_carry.sh                       # first call of a session: the job builds the engine
#   bash benchmarks/gpu_carry.sh /work/.device/1       # later calls: the packed engine and the host profile
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
mkdir -p .carry
[ -f .carry/gguf-0.19.0-py3-none-any.whl ] \
  || python3 -m pip download -q --no-deps --only-binary=:all: -d .carry gguf==0.19.0
if [ -n "${1:-}" ]; then
  cp "$1"/engine-cuda.tar.xz.part-* .carry/
  [ -f "$1/host-profile-saved.json" ] && cp "$1/host-profile-saved.json" .carry/host-profile.json
  rm -f .carry/llama.cpp.tar.gz
else
  [ -d vendor/llama.cpp ] || { echo "vendor/llama.cpp is missing: run scripts/setup.sh first" >&2; exit 1; }
  tar czf .carry/llama.cpp.tar.gz -C vendor --exclude=llama.cpp/models --exclude=llama.cpp/docs \
    --exclude=llama.cpp/media --exclude=llama.cpp/.git llama.cpp
  rm -f .carry/engine-cuda.tar.xz.part-* .carry/host-profile.json
fi
chmod -R u+w .carry
du -sh .carry; ls .carry
