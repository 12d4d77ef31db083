"""Smoke of the hot-path benchmark (loadtests/bench.py): out of the default suite.

Run with: .venv/bin/python -m pytest tests/test_bench_smoke.py -m load -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.load
@pytest.mark.timeout(300)
def test_bench_quick_reports_every_figure_for_gateway_nginx_and_direct(tmp_path: Path) -> None:
    """A quick run measures req/s, CPU-us/request and added latency, with no failed request, and writes JSON."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "bench.py"), "--quick", "--seconds", "1", "--repeat", "1",
         "--kinds", "anthropic-json,openai-sse", "--rates", "100", "--out", str(out)],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert 0 == proc.returncode, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert ["anthropic-json", "openai-sse"] == sorted(results["kinds"])
    for rows in results["kinds"].values():
        for target in ("direct", "nginx", "gateway"):
            sat = rows[target]["saturation"]
            assert 0 == sat["errors"]
            assert sat["rps"] > 0
            lat = rows[target]["latency"]["100"]
            assert 0.0 == lat["failed_rate"]
        for target in ("nginx", "gateway"):
            assert rows[target]["saturation"]["cpu_us_per_req"] > 0
            assert "added_p50_ms" in rows[target]["latency"]["100"]
        assert rows["ratio_gateway_vs_nginx"]["cpu_us_per_req"] > 1
    assert "gw/nginx" in proc.stdout


@pytest.mark.load
@pytest.mark.timeout(600)
def test_bench_counts_reports_calls_and_syscalls_per_request_for_every_target(tmp_path: Path) -> None:
    """The deterministic mode counts Python calls and syscalls per request for the pass-through,
    standalone and governed (Postgres + Redis + ledger) targets; two batch lengths agree."""
    out = tmp_path / "counts.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "bench.py"), "--counts", "--kinds", "openai-json",
         "--n1", "60", "--n2", "180", "--cpu-n", "300", "--out", str(out)],
        capture_output=True, text=True, timeout=580, check=False,
    )
    assert 0 == proc.returncode, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert ["governed", "passthrough", "standalone"] == sorted(results)
    for target, rows in results.items():
        row = rows["openai-json"]
        assert row["py_calls"] > 0 and row["c_calls"] > 0 and row["syscalls"] > 0 and row["cpu_us"] > 0, target
        # Deterministic: the short batch and the long one give the same count per request.
        assert abs(row["py_calls"] - row["py_calls_check"]) < 0.1 * row["py_calls"], (target, row)
    # The policy costs work: the governed path makes more calls than the bare pass-through.
    assert results["governed"]["openai-json"]["py_calls"] > results["passthrough"]["openai-json"]["py_calls"]


@pytest.mark.load
@pytest.mark.timeout(600)
def test_bench_scale_reports_memory_per_connection_and_stream_and_worker_scaling(tmp_path: Path) -> None:
    """RSS per idle keep-alive connection and per open stream, and 2 workers against 1, with no failed request."""
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "bench_scale.py"), "--idle", "100", "--streams", "200",
         "--seconds", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=580, check=False,
    )
    assert 0 == proc.returncode, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert 100 == report["idle"]["connections"] and report["idle"]["rss_after_kib"] > 0
    assert 200 == report["streams"]["streams"] and report["streams"]["rss_after_kib"] > 0
    assert 0 == report["throughput"]["errors_1"] == report["throughput"]["errors_2"]
    assert report["throughput"]["rps_1"] > 0 and report["throughput"]["rps_2"] > 0
