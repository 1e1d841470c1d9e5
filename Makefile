# The two entry points of the README. Each sets up .venv (and builds llama.cpp's tools once per machine) first; both
# steps are no-ops when already done.
.PHONY: setup llama-cpp quickstart test

setup:
	@bash scripts/setup.sh

llama-cpp: setup
	@bash scripts/llama_cpp.sh > /dev/null

quickstart: llama-cpp
	.venv/bin/slimlm compress recipes/quickstart.yaml
	@bash scripts/sample.sh runs/quickstart/export/model.gguf

test: llama-cpp
	.venv/bin/python -m pytest -q -p no:cacheprovider
