#!/usr/bin/env bash
# Idempotent set-up, saying what it does:
#   scripts/setup.sh run   what running the gateway needs: python3 + venv, then `pip install -e .`
#   scripts/setup.sh dev   (default) also the test and load-test tools: Postgres, Redis and
#                          systemd-analyze for the test suite, and `pip install -e '.[dev]'`
# VENV (default .venv) chooses the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-dev}"
case "$MODE" in
    run|dev) ;;
    *) echo "usage: scripts/setup.sh [run|dev]" >&2; exit 2 ;;
esac
say() { echo "setup: $*"; }

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ "$MODE" = dev ]; then  # the suite starts throwaway Postgres and Redis servers and verifies the systemd units
    [ -x /usr/lib/postgresql/15/bin/initdb ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
    command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
    command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
    # The console's browser tests drive Debian's Chromium through its own chromedriver (nothing downloaded at run time).
    [ -x /usr/bin/chromium ] || need_apt+=(chromium)
    [ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    say "installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtualenv $VENV"
    python3 -m venv "$VENV"
fi
hash="$(sha256sum pyproject.toml setup.py | sha256sum | cut -c1-16)"
# A dev install includes everything a run install has.
if [ -f "$VENV/.installed-dev-$hash" ] || { [ "$MODE" = run ] && [ -f "$VENV/.installed-run-$hash" ]; }; then
    say "$VENV is up to date ($MODE)"
    exit 0
fi
if [ "$MODE" = run ]; then
    say "installing llm-gateway and its run-time dependencies into $VENV (pip install -e .)"
    target="."
else
    say "installing llm-gateway with the test tools into $VENV (pip install -e '.[dev]'; the first time takes a few minutes)"
    target=".[dev]"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$target"
rm -f "$VENV"/.installed-*
touch "$VENV/.installed-$MODE-$hash"
say "done"
