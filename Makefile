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

loadtest: setup
	./loadtests/run.sh $(SCRIPT)

bench: setup
	.venv/bin/python loadtests/bench.py

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache loadtests/results/*
