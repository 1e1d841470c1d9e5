#!/usr/bin/env bash
# Builds llama.cpp's tools (perplexity, quantize, imatrix, bench, completion, simple) from the source tree the
# PyPI sdist of llama-cpp-python carries under vendor/llama.cpp, into a cache folder keyed by that version; prints
# the folder holding the binaries. About 10 minutes on 2 cores the first time; later calls return at once.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
# not under $SLIMLM_CACHE_DIR: the tests isolate that cache, and must not rebuild llama.cpp into it
CACHE=${SLIMLM_LLAMA_CPP_DIR:-$HOME/.cache/slimlm/llama.cpp}/$VERSION
TOOLS=(llama-perplexity llama-quantize llama-imatrix llama-bench llama-completion llama-simple)
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}

ready() { for tool in "${TOOLS[@]}"; do [ -x "$CACHE/bin/$tool" ] || return 1; done; }
if ready; then echo "$CACHE/bin"; exit 0; fi

work=$(mktemp -d "${TMPDIR:-/tmp}/slimlm-llama-cpp.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building llama.cpp from llama-cpp-python==$VERSION (once per machine, ~10 min on 2 cores) ..." >&2
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
source_dir="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$source_dir" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" -j "$(nproc)" --target "${TOOLS[@]}" >&2

# Assemble beside the cache and rename into place, so an interrupted build never leaves half a bin folder.
staging="$CACHE.tmp-$$"
rm -rf "$staging" && mkdir -p "$staging/bin"
for tool in "${TOOLS[@]}"; do cp "$work/build/bin/$tool" "$staging/bin/"; done
# the sdist carries no git metadata; its CHANGELOG names the llama.cpp commit each release vendors
commit=$(awk -v head="## [$VERSION]" '$0 == head {on = 1; next} /^## \[/ {on = 0} on' \
  "$work/llama_cpp_python-$VERSION/CHANGELOG.md" | grep -o -m1 'llama.cpp@[0-9a-f]*' || true)
echo "llama-cpp-python $VERSION ${commit:-llama.cpp commit unknown}" > "$staging/VERSION"
rm -rf "$CACHE" && mkdir -p "$(dirname "$CACHE")" && mv "$staging" "$CACHE"
echo "$CACHE/bin"
