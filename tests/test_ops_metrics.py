"""GET /metrics: what is counted, with which labels, and the sum over worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_KEY, MockUpstream, gateway_toml

ANTHROPIC_HEADERS = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
BODY = {"model": "demo-claude", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out.append((s.labels, s.value))
    return out


def total(text: str, name: str, **match: str) -> float:
    return sum(v for labels, v in samples(text, name) if all(labels.get(k) == want for k, want in match.items()))


async def test_requests_are_counted_with_configured_labels_only(gateway: Any) -> None:
    """A proxied request is counted by endpoint, route, model, status and error; /ak keys never reach a label."""
    r = await gateway.post("/v1/messages", json=BODY, headers=ANTHROPIC_HEADERS)
    assert 200 == r.status
    r = await gateway.post(f"/ak/{TEST_KEY}/v1/messages", json=BODY, headers={"anthropic-version": "2023-06-01"})
    assert 200 == r.status
    r = await gateway.post("/v1/messages", json={**BODY, "model": "no-such-model-x1"}, headers=ANTHROPIC_HEADERS)
    assert 404 == r.status

    r = await gateway.get("/metrics")
    assert 200 == r.status
    assert r.headers["content-type"].startswith("text/plain")
    text = await r.text()
    assert TEST_KEY not in text
    assert "no-such-model-x1" not in text
    ok = total(text, "gateway_requests_total", endpoint="/v1/messages", route="demo-*", status="200", error="none")
    assert 2.0 == ok
    # demo-claude matches the glob route but is no configured model name: bucketed.
    assert {"other"} == {lab["model"] for lab, _ in samples(text, "gateway_requests_total")}
    assert 1.0 == total(text, "gateway_requests_total", route="", status="404", error="not_found")
    assert 2.0 == total(text, "gateway_admission_decisions_total", decision="admitted")
    assert 3.0 == total(text, "gateway_overhead_seconds_count", endpoint="/v1/messages")
    assert 2.0 == total(text, "gateway_upstream_seconds_count", upstream="mock-anthropic")
    assert total(text, "gateway_tokens_total", route="demo-*", direction="output") > 0
    assert total(text, "gateway_cost_usd_total", route="demo-*") > 0
    assert 0.0 == total(text, "gateway_requests_in_flight")  # idle: the scrape does not count itself
    assert 1.0 == total(text, "gateway_circuit_state", upstream="mock-anthropic", state="closed")
    assert 0.0 == total(text, "gateway_dependency_degraded", dependency="redis")


async def test_circuit_state_gauge_follows_the_breaker(make_gateway: Any, mock_upstream: MockUpstream) -> None:
    """Upstream failures that open a breaker show as state="open" for that upstream."""
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra="""
        [upstreams.mock-anthropic.breaker]
        failure_threshold = 2
        cooldown_seconds = 60
    """).replace("idle_timeout = 2\n", "idle_timeout = 2\nretries = 0\n"))  # the breaker alone, no retries
    for _ in range(2):
        await gw.post("/v1/messages", json=BODY, headers={**ANTHROPIC_HEADERS, "x-mock-status": "500"})
    text = await (await gw.get("/metrics")).text()
    assert 1.0 == total(text, "gateway_circuit_state", upstream="mock-anthropic", state="open")
    assert 0.0 == total(text, "gateway_circuit_state", upstream="mock-anthropic", state="closed")
    assert 2.0 == total(text, "gateway_requests_total", status="500", error="upstream_status")


def _pids(prom_dir: Path) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in prom_dir.glob("counter_*.db") if not p.stem.endswith("archive")}


async def _scrape(url: str) -> str:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, s.get(url) as r:
        assert 200 == r.status
        return await r.text()


async def test_metrics_sum_over_two_workers_and_survive_a_worker_crash(
    serve: Callable[..., Any], mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    """Every worker's /metrics reports the same total of all workers; a crashed worker's counts are kept."""
    prom_dir = tmp_path / "prom"
    gw = serve(gateway_toml(mock_upstream.base_url, workers=2), workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(prom_dir)})
    n = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async def one() -> None:
            async with s.post(gw.base_url + "/v1/messages", json=BODY, headers=ANTHROPIC_HEADERS) as r:
                assert 200 == r.status
                await r.read()

        # New connections until both workers have served some (the kernel picks the acceptor).
        while n < 40 or (len(_pids(prom_dir)) < 2 and n < 800):
            await asyncio.gather(*(one() for _ in range(8)))
            n += 8

    # Workers flush their counts every second: wait until a scrape has them all, then every scrape agrees.
    deadline = asyncio.get_running_loop().time() + 30
    while total(await _scrape(gw.base_url + "/metrics"), "gateway_requests_total", endpoint="/v1/messages",
                status="200") != float(n):
        assert asyncio.get_running_loop().time() < deadline, "the workers' counts never added up"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.2)  # and one more flush period: no late flush may change the totals
    assert 2 == len(_pids(prom_dir)), "both workers served requests"
    for _ in range(6):  # new connections: scrapes land on either worker
        text = await _scrape(gw.base_url + "/metrics")
        assert float(n) == total(text, "gateway_requests_total", endpoint="/v1/messages", status="200")
        assert 2.0 == total(text, "gateway_workers")

    victim = min(_pids(prom_dir))
    os.kill(victim, signal.SIGKILL)
    for _ in range(200):
        await asyncio.sleep(0.05)
        if victim not in _pids(prom_dir) and (prom_dir / "counter_archive.db").exists():
            break
    assert victim not in _pids(prom_dir)
    for _ in range(600):  # the replacement worker starts (slowly on a loaded machine)
        text = await _scrape(gw.base_url + "/metrics")
        if total(text, "gateway_workers") == 2.0:
            break
        await asyncio.sleep(0.1)
    assert 2.0 == total(text, "gateway_workers")
    assert float(n) == total(text, "gateway_requests_total", endpoint="/v1/messages", status="200")
    assert float(n) == total(text, "gateway_overhead_seconds_count", endpoint="/v1/messages")


async def test_unmatched_paths_share_one_label_set(gateway: Any) -> None:
    """Requests to unknown paths count under one endpoint="unmatched" label set, never by their path."""
    for i in range(20):
        r = await gateway.get(f"/no/such/path/{i}")
        assert 404 == r.status
    text = await (await gateway.get("/metrics")).text()
    assert 20.0 == total(text, "gateway_requests_total", endpoint="unmatched", status="404", error="unknown_path")
    assert "/no/such/path" not in text


async def test_metrics_keep_their_totals_across_a_rolling_reload(
    serve: Callable[..., Any], mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    """SIGHUP replaces every worker; the old workers' counts are folded in, and only live workers count as workers."""
    prom_dir = tmp_path / "prom"
    gw = serve(gateway_toml(mock_upstream.base_url, workers=2), workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(prom_dir)})
    n = 24
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(n):
            async with s.post(gw.base_url + "/v1/messages", json=BODY, headers=ANTHROPIC_HEADERS) as r:
                assert 200 == r.status
    old = _pids(prom_dir)
    gw.signal(signal.SIGHUP)
    for _ in range(300):
        await asyncio.sleep(0.05)
        if '"reloaded"' in gw.log_text() and not (old & _pids(prom_dir)):
            break
    assert '"reloaded"' in gw.log_text()
    assert set() == old & _pids(prom_dir), "the old workers' files were folded away"
    text = await _scrape(gw.base_url + "/metrics")
    assert float(n) == total(text, "gateway_requests_total", endpoint="/v1/messages", status="200")
    assert 2.0 == total(text, "gateway_workers")


async def test_in_flight_counts_open_streams_and_reads_zero_at_idle(gateway: Any) -> None:
    """An open stream is 1 in flight; once it ends, and at idle, 0 (a scrape never counts itself)."""
    text = await (await gateway.get("/metrics")).text()
    assert 0.0 == total(text, "gateway_requests_in_flight")
    headers = {**ANTHROPIC_HEADERS, "x-mock-chunks": "40", "x-mock-chunk-gap-ms": "50"}
    r = await gateway.post("/v1/messages", json={**BODY, "stream": True}, headers=headers)
    assert 200 == r.status
    await r.content.readany()  # the stream is open
    text = await (await gateway.get("/metrics")).text()
    assert 1.0 == total(text, "gateway_requests_in_flight")
    await r.read()
    for _ in range(600):  # the request finishes after its last byte: wait for it, not for a fixed time
        text = await (await gateway.get("/metrics")).text()
        if total(text, "gateway_requests_in_flight") == 0.0:
            break
        await asyncio.sleep(0.05)
    assert 0.0 == total(text, "gateway_requests_in_flight")
