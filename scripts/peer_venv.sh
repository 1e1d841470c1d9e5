#!/usr/bin/env bash
# Creates benchmarks/.peer-venv with llmcompressor, the peer that benchmarks/peer_llmcompressor.py compares slimlm's
# GPTQ against. It gets a venv of its own because llmcompressor pins transformers below slimlm's pin.
# Idempotent: a no-op when this script has not changed since the last successful run.
#
# Mirrors scripts/setup.sh: torch is installed first, pinned to the same version as the main venv (this machine
# has its CPU wheel on disk, see pip's find-links); on a GPU machine, install the CUDA build of the same version
# into the peer venv first and pip keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=benchmarks/.peer-venv
TORCH_VERSION=2.13.0
LLMCOMPRESSOR_VERSION=0.14.0.1
TRANSFORMERS_VERSION=5.17.0  # the newest llmcompressor 0.14 accepts (it requires >=5.15.0,<=5.17.0)
stamp=$VENV/.peer-setup
want=$(sha256sum scripts/peer_venv.sh | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
# pip names each empty local index it looked in; those lines say nothing about the install
pip_install() { "$py" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_install --upgrade pip
pip_install "torch==$TORCH_VERSION"
# torch stays pinned while llmcompressor resolves the rest (transformers within llmcompressor's own bounds).
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" > "$constraints"
pip_install -c "$constraints" "llmcompressor==$LLMCOMPRESSOR_VERSION" "transformers==$TRANSFORMERS_VERSION" \
    "safetensors==0.8.0" "datasets==5.2.0"
"$py" -m pip freeze > "$VENV/freeze.txt"
"$py" - <<'PY'
import torch, transformers, llmcompressor, compressed_tensors
print(f"peer venv: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}")
PY
echo "$want" > "$stamp"
