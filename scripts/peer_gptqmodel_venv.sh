#!/usr/bin/env bash
# Creates benchmarks/.peer-gptqmodel-venv with GPTQModel, the second GPTQ peer (benchmarks/peer/gptqmodel_gptq.py).
# It gets a venv of its own because GPTQModel pins numpy (==2.2.6) and pulls torchao, neither of which slimlm's
# venv should carry. Idempotent: a no-op when this script has not changed since the last successful run.
#
# GPTQModel 7.6.0 is the newest release that accepts torch 2.13 (7.7.0 requires torch>=2.14.1). It is a pure-Python
# sdist: its kernels (gptqmodel_ext/) are compiled just in time on first use, never at install, so there is no
# CUDA build to switch off (the BUILD_CUDA_EXT / GPTQMODEL_FORCE_BUILD switches of older releases are gone). The
# GPTQ pass itself is plain torch. torch is installed first, pinned to the main venv's version (this machine has
# its CPU wheel on disk, see pip's find-links) and held by a constraint while GPTQModel resolves the rest, so pip
# can never swap in a CUDA torch; on a GPU machine, install the CUDA build of the same version first and pip keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=benchmarks/.peer-gptqmodel-venv
TORCH_VERSION=2.13.0
GPTQMODEL_VERSION=7.6.0
TRANSFORMERS_VERSION=5.23.0 # slimlm's own pin; GPTQModel 7.6.0 asks for >=5.14.0
stamp=$VENV/.peer-setup
want=$(sha256sum scripts/peer_gptqmodel_venv.sh | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
# pip names each empty local index it looked in; those lines say nothing about the install
pip_install() { "$py" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_install --upgrade pip
pip_install "torch==$TORCH_VERSION"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"
pip_install -c "$constraints" "gptqmodel==$GPTQMODEL_VERSION" "transformers==$TRANSFORMERS_VERSION" \
    "safetensors==0.8.0" "datasets==5.2.0"
"$py" -m pip freeze >"$VENV/freeze.txt"
# GPTQModel packs on CPU with a C++ extension it JIT-compiles on first use (~20 s, cached under
# ~/.cache/gptqmodel): built here so that no timed run pays for it.
CUDA_VISIBLE_DEVICES="" "$py" - <<'PY'
import torch, transformers, gptqmodel
from gptqmodel import extension
assert not torch.version.cuda, f"the peer venv got a CUDA torch ({torch.version.cuda}); it must be the CPU build"
if not extension.is_available("pack_block_cpu"):
    print(f"peer venv: GPTQModel's pack_block_cpu extension did not build, packing will use its Python path: "
          f"{extension.error('pack_block_cpu')}")
print(f"peer venv: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"gptqmodel {gptqmodel.__version__}")
PY
echo "$want" >"$stamp"
