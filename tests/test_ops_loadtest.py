"""The load-test runner: starts the stack, runs k6, writes results, stops everything."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_runner(tmp_path: Path, scale: str, *scripts: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    env = {**os.environ, "DURATION_SCALE": scale, "RESULTS_DIR": str(tmp_path / "results")}
    r = subprocess.run(
        [str(ROOT / "loadtests" / "run.sh"), *scripts], capture_output=True, text=True, env=env, cwd=ROOT, timeout=240,
    )
    return r, (tmp_path / "results" / "latest").resolve()


def assert_stack_stopped(run_dir: Path) -> None:
    stack = json.loads((run_dir / "stack.json").read_text())
    assert not _pid_alive(stack["gateway_pid"])
    for name in ("postgres_port", "redis_port", "mock_port"):
        assert not _listening(stack[name]), name
    assert not _listening(int(stack["base_url"].rsplit(":", 1)[1]))


@pytest.mark.slow
def test_runner_smoke_run_passes_and_cleans_up(tmp_path: Path) -> None:
    """run.sh gateway-smoke.js (15 s): zero errors, thresholds met, results written, nothing left running."""
    r, run_dir = run_runner(tmp_path, "0.5", "gateway-smoke.js")
    assert 0 == r.returncode, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = summary["metrics"]
    assert metrics["http_reqs"]["count"] > 20
    assert 0 == metrics["http_req_failed"]["value"]
    assert metrics["gateway_latency"]["p(95)"] > 0
    assert metrics["policy_check_latency"]["max"] > 0
    for name in ("summary.txt", "k6.json.gz", "gateway.log", "metrics.txt"):
        assert (run_dir / name).stat().st_size > 0, name
    assert "gateway_requests_total" in (run_dir / "metrics.txt").read_text()
    key_source = json.loads((run_dir / "stack.json").read_text())["key_source"]
    assert key_source in ("admin-api", "config")
    assert_stack_stopped(run_dir)


@pytest.mark.slow
def test_runner_shortened_load_run_passes(tmp_path: Path) -> None:
    """gateway-load.js at DURATION_SCALE=0.02 (~12 s, up to 50 VUs) meets its thresholds through the runner."""
    r, run_dir = run_runner(tmp_path, "0.02", "gateway-load.js")
    assert 0 == r.returncode, r.stdout[-4000:] + r.stderr[-2000:]
    metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
    assert metrics["vus_max"]["value"] >= 50
    assert metrics["http_req_failed"]["value"] < 0.01
    assert_stack_stopped(run_dir)


def test_runner_refuses_an_unknown_script(tmp_path: Path) -> None:
    """A misspelt script name fails fast with status 2 and starts nothing."""
    r, _ = run_runner(tmp_path, "1", "no-such-script.js")
    assert 2 == r.returncode
    assert "no such script" in r.stderr
