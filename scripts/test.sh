#!/usr/bin/env bash
# The whole test suite: lint, types, pytest (real Postgres/Redis/HTTP), k6 smoke.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
