#!/usr/bin/env bash
# Set-up for a fresh machine, idempotent and quick when repeated:
#   1. a virtual environment (.venv) with ccmoe-runtime and its Python dependencies;
#   2. llama-cpp-python's pinned source package, downloaded once into the cache; its Python bindings are
#      installed WITHOUT their own compile (-DLLAMA_BUILD=OFF): they load the engine's libraries instead;
#   3. vendor/llama.cpp from that package and the llama.cpp tools built for this host's backend into
#      ~/.cache/ccmoe-runtime/engines/<commit>-<backend>-<flags hash> (reused in seconds next time);
#   4. the English corpus (Debian's `fortunes` package) for tests and calibration.
# Usage: scripts/setup.sh [--train]   (--train adds torch, transformers and sentencepiece, needed by the tests
#                                     of the training code and of the Hugging Face conversion)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CCMOE_VENV:-.venv}
CACHE=${CCMOE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ccmoe-runtime}
PKG=llama-cpp-python==0.3.36
SDIST="$CACHE/sdist/llama_cpp_python-0.3.36.tar.gz"
extras="test"
[ "${1:-}" = "--train" ] && extras="test,train,convert"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.ccmoe-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing Python packages into $VENV"
  if [ ! -f "$SDIST" ]; then
    mkdir -p "$CACHE/sdist"
    python -m pip download -q --no-deps --no-binary :all: -d "$CACHE/sdist" "$PKG"
  fi
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python -m pip install -q "$SDIST"
  python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
echo "== llama.cpp engine (cached by commit + backend + flags)"
ccmoe-run engine build ${CCMOE_BACKEND:+--backend "$CCMOE_BACKEND"}
echo "== English corpus"
ccmoe-run corpus
# The report test renders the HTML report in a real browser: Debian's chromium (~15 s to install as root).
if [ "${1:-}" = "--train" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== chromium (for the report test)"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1 \
      || echo "   chromium could not be installed; the report test will be skipped"
  else
    echo "== chromium not found and not root: the report's browser test will be skipped (apt-get install chromium)"
  fi
fi
