# The two entry points of the README. Each sets up .venv first (a no-op when already done).
.PHONY: setup quickstart test

setup:
	@bash scripts/setup.sh

quickstart: setup
	.venv/bin/slimlm compress recipes/quickstart.yaml

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider
