#!/usr/bin/env bash
# Start the gateway on its embedded default (standalone, bundled mock upstream).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/llm-gateway serve "$@"
