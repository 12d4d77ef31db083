#!/usr/bin/env bash
# Run k6 scripts against a local stack (throwaway Postgres + Redis, migrations,
# the gateway with every worker, the mock upstream), then stop everything.
#   loadtests/run.sh gateway-smoke.js [more.js ...] [-- extra k6 args]
#   DURATION_SCALE=0.1 loadtests/run.sh gateway-load.js
# Results: loadtests/results/<time>-<script>/ (and loadtests/results/latest).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -eq 0 ]; then
    echo "usage: loadtests/run.sh SCRIPT.js [SCRIPT.js ...] [-- k6 args]" >&2
    echo "scripts: gateway-smoke.js gateway-load.js gateway-stress.js gateway-spike.js performance/load-test.js" >&2
    exit 2
fi
./scripts/setup.sh
exec .venv/bin/python loadtests/stack.py "$@"
