"""One key cannot starve the others of the upstream connection pool.

The mock upstreams get a pool of 4 connections; one key may hold half of it
(2), one user three quarters.  Key A opens 6 slow requests; key B (another
user) is then served at once, while A's extra requests are queued (never
reaching the upstream) or, with no queueing allowed, refused with 429.
Assertions are on order and counts, not on time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.proxy.fairshare import FairShare
from tests.conftest import OTHER_KEY, TEST_KEY, gateway_toml

AV = {"anthropic-version": "2023-06-01"}
SLOW = {"x-api-key": TEST_KEY, **AV, "x-mock-latency-ms": "4000"}  # < first_byte_timeout (5 s)
A_MSG = {"model": "demo-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
B_MSG = {"model": "demo-allowed-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def toml(upstream: str, wait: float) -> str:
    text = gateway_toml(upstream).replace("idle_timeout = 2\n", "idle_timeout = 2\nmax_connections = 4\n")
    return text.replace("[server]", f"[server]\nshare_wait_seconds = {wait}", 1)


async def _post(gw: Any, headers: dict[str, str], body: dict[str, Any]) -> int:
    r = await gw.post("/v1/messages", headers=headers, json=body)
    await r.read()
    return r.status


async def _upstream_count(mock_upstream: Any, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(await mock_upstream.requests()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the upstream never saw {n} requests")
        await asyncio.sleep(0.02)


async def test_other_key_is_served_while_one_key_has_its_extra_requests_queued(make_gateway, mock_upstream):
    """A holds its share (2) with slow requests, 4 more wait; B is served before any of A's finishes."""
    gw = await make_gateway(toml(mock_upstream.base_url, wait=30))
    a_tasks = [asyncio.ensure_future(_post(gw, SLOW, A_MSG)) for _ in range(6)]
    try:
        await _upstream_count(mock_upstream, 2)  # A's share is in use upstream
        b_status = await _post(gw, {"x-api-key": OTHER_KEY, **AV}, B_MSG)
        assert 200 == b_status
        assert not any(t.done() for t in a_tasks)  # B was served while all of A's were still pending
        seen = await mock_upstream.requests()
        assert 3 == len(seen)  # A's 2 in flight + B's; A's other 4 are queued in the gateway
    finally:
        for t in a_tasks:
            t.cancel()
        await asyncio.gather(*a_tasks, return_exceptions=True)


async def test_without_queueing_extra_requests_of_one_key_get_429(make_gateway, mock_upstream):
    """share_wait_seconds = 0: A's 6 concurrent requests: 2 served, 4 refused with 429 and retry-after."""
    gw = await make_gateway(toml(mock_upstream.base_url, wait=0))
    statuses: list[int] = []
    retry_after: list[str] = []

    async def one() -> None:
        r = await gw.post("/v1/messages", headers=SLOW, json=A_MSG)
        body = await r.json()
        statuses.append(r.status)
        if r.status == 429:
            retry_after.append(r.headers["retry-after"])
            assert "rate_limit_error" == body["error"]["type"]

    a_tasks = [asyncio.ensure_future(one()) for _ in range(6)]
    await _upstream_count(mock_upstream, 2)
    assert 200 == await _post(gw, {"x-api-key": OTHER_KEY, **AV}, B_MSG)
    await asyncio.gather(*a_tasks)
    assert [200, 200, 429, 429, 429, 429] == sorted(statuses)
    assert ["1"] * 4 == retry_after
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_fair_share_events_total{event="refused"} 4.0' in metrics


@pytest.mark.parametrize(("pool", "caps"), [(256, (128, 192)), (4, (2, 3)), (1, (1, 1)), (3, (1, 2))])
def test_share_caps_table(pool, caps):
    """The default shares (1/2 per key, 3/4 per user) of a pool, never below one."""
    assert caps == FairShare(0.5, 0.75, 5.0).caps(pool)


async def test_share_is_released_and_waiters_are_served_in_turn():
    """Pure logic: over the cap a request waits, a release lets exactly one in, a timeout refuses."""
    share = FairShare(0.5, 1.0, 5.0)
    held = [await share.acquire("k", "u", 4) for _ in range(2)]
    waiting = [asyncio.ensure_future(share.acquire("k", "u", 4)) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiting)
    other = await share.acquire("k2", "u", 4)  # another key of the same user still fits (user cap 4)
    held[0].release()
    done, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    assert 1 == len(done) and 1 == len(pending)
    assert 2 == share.in_flight("k")
    for lease in (held[1], other, *[d.result() for d in done]):
        lease.release()
    (await next(iter(pending))).release()
    assert 0 == share.in_flight("k")
