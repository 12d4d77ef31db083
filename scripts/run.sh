#!/usr/bin/env bash
# Start the gateway on its embedded default (standalone, bundled mock upstream).
# Installs only what running needs (no test tools); scripts/test.sh installs those.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh run
echo "run: starting llm-gateway serve $* (Ctrl-C stops it)"
exec "${VENV:-.venv}/bin/llm-gateway" serve "$@"
