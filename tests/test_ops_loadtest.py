"""The load-test runner: starts the stack, runs k6, writes results, stops everything."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_KEY, MockUpstream, gateway_toml

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
    # Short runs on a shared machine check errors and functionality; latency gates belong to make loadtest.
    env = {**os.environ, "DURATION_SCALE": scale, "RESULTS_DIR": str(tmp_path / "results"), "LATENCY_GATES": "0"}
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
    """run.sh gateway-smoke.js (~11 s): zero errors, thresholds met, results written, nothing left running."""
    r, run_dir = run_runner(tmp_path, "0.35", "gateway-smoke.js")
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
    """gateway-load.js at DURATION_SCALE=0.02 (~12 s, up to 50 VUs) meets its error and check thresholds
    through the runner (no latency gate: that is for make loadtest on a quiet machine)."""
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


SETUP = ROOT / "loadtests" / "setup_test_user.py"


async def _setup_user(base_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, str(SETUP), "--base-url", base_url, *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


def _parse(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


async def test_setup_test_user_creates_a_working_key_through_the_admin_api(
    make_gateway: Any, mock_upstream: MockUpstream, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a database, the script creates the user (with a password) and a key that the data plane accepts."""
    from gateway.stores.migrate import migrate_dsn

    await migrate_dsn(pg_dsn)
    monkeypatch.setenv("OPS_SETUP_DATABASE_URL", pg_dsn)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "ops-test-admin-token-" + "x" * 32)
    monkeypatch.setenv("GATEWAY_JWT_SECRET", "ops-test-jwt-secret-" + "y" * 32)
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra="""
        [database]
        url_env = "OPS_SETUP_DATABASE_URL"
    """))
    base = str(gw.make_url("")).rstrip("/")
    r = await _setup_user(base, "--admin-token", os.environ["GATEWAY_ADMIN_TOKEN"])
    assert 0 == r.returncode, r.stderr
    out = _parse(r.stdout)
    assert "admin-api" == out["KEY_SOURCE"]
    assert out["API_KEY"].startswith("gwk_")
    resp = await gw.post("/v1/messages", json={"model": "demo-claude", "max_tokens": 8,
                                               "messages": [{"role": "user", "content": "hi"}]},
                         headers={"x-api-key": out["API_KEY"], "anthropic-version": "2023-06-01"})
    assert 200 == resp.status
    login = await gw.post("/auth/login", json={"email": out["LOADTEST_EMAIL"], "password": out["LOADTEST_PASSWORD"]})
    assert 200 == login.status
    # A second run reuses the user and makes another key.
    again = await _setup_user(base, "--admin-token", os.environ["GATEWAY_ADMIN_TOKEN"])
    assert 0 == again.returncode, again.stderr
    assert out["API_KEY"] != _parse(again.stdout)["API_KEY"]


async def test_setup_test_user_falls_back_to_the_config_key_when_standalone(
    make_gateway: Any, mock_upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standalone gateway has no database behind its admin API: the config-file key given as fallback is printed."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "ops-test-admin-token-" + "x" * 32)
    gateway = await make_gateway(gateway_toml(mock_upstream.base_url))
    base = str(gateway.make_url("")).rstrip("/")
    r = await _setup_user(base, "--admin-token", "ops-test-admin-token-" + "x" * 32, "--fallback-key", TEST_KEY)
    assert 0 == r.returncode, r.stderr
    assert {"API_KEY": TEST_KEY, "KEY_SOURCE": "config"} == _parse(r.stdout)


K6 = ROOT / ".venv" / "bin" / "k6"
PROBE_KEY = "gwk_k6probe_" + "p" * 32  # may use the smoke's models; its policy probe (demo-policy-probe) gets 403


@pytest.fixture
async def k6_gateway(make_gateway: Any, mock_upstream: MockUpstream) -> Any:
    from tests.conftest import sha

    return await make_gateway(gateway_toml(mock_upstream.base_url, extra=f"""
        [[keys]]
        name = "k6"
        key_sha256 = "{sha(PROBE_KEY)}"
        limits = {{ models = ["demo-claude", "demo-gpt"] }}
    """))


async def _k6_smoke(base_url: str, tmp_path: Path, **env: str) -> tuple[int, str, dict[str, Any]]:
    """gateway-smoke.js, 2 s, straight at a gateway (the deployed-gateway recipe, no runner)."""
    summary = tmp_path / "summary.json"
    proc = await asyncio.create_subprocess_exec(
        str(K6), "run", "--no-color", "--quiet", "--summary-export", str(summary),
        "-e", f"BASE_URL={base_url}", "-e", f"API_KEY={PROBE_KEY}", "-e", "DURATION_SCALE=0.05",
        *(a for k, v in env.items() for a in ("-e", f"{k}={v}")),
        str(ROOT / "loadtests" / "gateway-smoke.js"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "K6_NO_USAGE_REPORT": "true"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    doc = json.loads(summary.read_text()) if summary.exists() else {}
    return proc.returncode or 0, out.decode(errors="replace"), doc


def _thresholds(summary: dict[str, Any]) -> set[str]:
    return {name for name, m in summary.get("metrics", {}).items() if m.get("thresholds")}


@pytest.mark.slow
async def test_a_probe_that_cannot_run_is_reported_skipped_never_passed(k6_gateway: Any, tmp_path: Path) -> None:
    """Without login or admin credentials k6 says the probes are skipped and sets no threshold on them
    (a threshold on a metric never measured would print as passed); REQUIRE_CONTROL_PLANE=1 fails loudly."""
    base = str(k6_gateway.make_url("")).rstrip("/")
    code, out, summary = await _k6_smoke(base, tmp_path, LATENCY_GATES="0")
    assert "SKIPPED, no threshold: login probe" in out, out[-3000:]
    assert "SKIPPED, no threshold: admin probe" in out
    assert out.count("SKIPPED, no threshold: login probe") <= 2  # k6's option-reading init runs, not once per VU
    names = _thresholds(summary)
    assert "http_req_failed" in names and "checks" in names
    assert not [n for n in names if "endpoint:auth" in n or "endpoint:admin" in n], names
    assert not [n for n in names if "duration" in n or "latency" in n], names  # LATENCY_GATES=0
    assert 0 == summary["metrics"]["http_req_failed"]["value"], out[-3000:]
    assert 0 == code, out[-3000:]

    # With the admin token the admin probe runs, is measured and must have answered at least once.
    code, out, summary = await _k6_smoke(base, tmp_path, ADMIN_TOKEN="ops-test-admin-token-" + "x" * 32)
    assert "SKIPPED, no threshold: admin probe" not in out
    names = _thresholds(summary)
    assert {"http_reqs{endpoint:admin}", "http_req_duration{endpoint:admin}", "gateway_latency"} <= names, names
    assert not [n for n in names if "endpoint:auth" in n]

    code, out, _ = await _k6_smoke(base, tmp_path, REQUIRE_CONTROL_PLANE="1")
    assert 0 != code
    assert "REQUIRE_CONTROL_PLANE=1 but the control-plane probes cannot run" in out
