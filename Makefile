.PHONY: setup run test check lint typecheck loadtest bench clean

setup:
	./scripts/setup.sh

run:
	./scripts/run.sh

test:
	./scripts/test.sh

check: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

SCRIPT ?= gateway-smoke.js
loadtest: setup  # make loadtest SCRIPT=gateway-load.js [DURATION_SCALE=0.1]
	./loadtests/run.sh $(SCRIPT)

bench: setup
	.venv/bin/python loadtests/bench.py

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache loadtests/results/*
