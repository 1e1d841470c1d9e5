#!/usr/bin/env bash
# A short greedy generation from a GGUF file with llama.cpp itself (llama-completion), to show the exported model
# running outside slimlm.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/sample.sh MODEL.gguf [PROMPT]}
prompt=${2:-"Three things to check before deploying a small language model on a laptop:"}
bin=$(bash scripts/llama_cpp.sh)
echo "llama.cpp ($bin/llama-completion) on $model ($(du -h "$model" | cut -f1)):"
"$bin/llama-completion" -m "$model" -p "$prompt" -n 48 --temp 0 -no-cnv --simple-io -t 2 --no-warmup 2>/dev/null
echo
