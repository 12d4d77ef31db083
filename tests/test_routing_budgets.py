"""Retry and hedge budgets: an outage is never amplified into a storm.

The budget arithmetic is tested as a property with a fake clock; the storm is real: concurrent
requests through the gateway against an upstream that answers 500 to everything, counting the
attempts that upstream saw.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from typing import Any

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.resilience.retry import Budget, backoff, retry_after
from tests.conftest import TEST_KEY
from tests.fixtures.routing import (  # noqa: F401 - fixture
    fallbacks,
    mocks,
    pair,
    routing_toml,
    upstream_toml,
)

AUTH = {"authorization": f"Bearer {TEST_KEY}"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["request", "extra"]), st.floats(0, 2)), max_size=300))
def test_budget_never_allows_more_than_ratio_of_requests_plus_rate(ops: list[tuple[str, float]]) -> None:
    """Whatever the order of requests, extra attempts and elapsed time: granted extras <=
    initial balance + 20 % of requests + 3 per second."""
    clock = Clock()
    budget = Budget(clock=clock)
    initial = budget.balance
    requests = granted = 0
    for op, dt in ops:
        clock.now += dt
        if op == "request":
            budget.deposit()
            requests += 1
        elif budget.withdraw():
            granted += 1
    assert granted <= initial + 0.2 * requests + 3.0 * clock.now + 1e-9


def test_budget_refuses_once_spent_and_recovers_with_time_and_requests() -> None:
    clock = Clock()
    budget = Budget(clock=clock)
    assert [True, True, True, False] == [budget.withdraw() for _ in range(4)]
    assert 1 == budget.denied
    for _ in range(5):
        budget.deposit()  # 5 requests x 0.2 = one extra attempt
    assert budget.withdraw() is True
    assert budget.withdraw() is False
    clock.now += 1.0  # 3 more a second
    assert [True, True, True, False] == [budget.withdraw() for _ in range(4)]
    clock.now += 3600  # a quiet hour saves no more than the cap
    assert 10 == sum(budget.withdraw() for _ in range(20))


BACKOFF_TABLE = [  # retry, base ms, cap s, random draw -> seconds
    (0, 200, 10.0, 1.0, 0.2),
    (1, 200, 10.0, 1.0, 0.4),
    (3, 200, 10.0, 0.5, 0.8),
    (10, 200, 10.0, 1.0, 10.0),  # capped at max_retry_wait
    (2, 200, 10.0, 0.0, 0.0),  # full jitter: anything down to zero
]


def test_backoff_is_full_jitter_of_an_exponential_ceiling() -> None:
    for retry, base, cap, draw, expected in BACKOFF_TABLE:
        assert abs(expected - backoff(retry, base, cap, lambda d=draw: d)) < 1e-9, (retry, base, cap, draw)


RETRY_AFTER_TABLE = [
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer one wins
    ({"retry-after": "3"}, 3.0),
    ({"retry-after": " 1.5 "}, 1.5),
    ({"retry-after": "Tue, 01 Dec 2026 00:00:30 GMT"}, 30.0),
    ({"retry-after": "soon"}, None),
    ({"retry-after": "-1"}, None),
    ({"retry-after-ms": "x", "retry-after": "2"}, 2.0),
    ({}, None),
]


def test_retry_after_parsing_table() -> None:
    now = calendar.timegm((2026, 12, 1, 0, 0, 0))  # 2026-12-01T00:00:00Z
    for headers, expected in RETRY_AFTER_TABLE:
        got = retry_after(headers, now=lambda: now)
        assert expected == (None if got is None else round(got, 3)), headers


async def test_a_500_storm_is_not_amplified_beyond_the_retry_budget(make_gateway, mocks):  # noqa: F811
    """200 concurrent requests, upstream a answers 500 to all (retries = 2 would mean 600 attempts
    without a budget): a sees at most 1.2 per request plus 3 a second (plus the starting balance); b,
    the fallback, serves every request."""
    a, b = await mocks(), await mocks()
    await a.faults(then={"x-mock-status": "500"})
    raw = "breaker = { failure_threshold = 100000 }\n"
    ups = (upstream_toml("a", a.base_url, raw=raw, retries=2, retry_base_ms=1)
           + upstream_toml("b", b.base_url, raw=raw, max_connections=512))
    gw = await make_gateway(routing_toml(ups, f"""
        [[routes]]
        match = "demo-storm"
        deployments = {pair(["a"])}
        fallbacks = {fallbacks(["b"])}
        """))
    url = str(gw.make_url("/v1/chat/completions"))
    n = 200
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:

        async def one() -> int:
            async with s.post(url, headers=AUTH, json={"model": "demo-storm", "messages": []}) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.monotonic() - t0
    assert [200] * n == statuses
    seen_a = await a.count()
    assert n == await b.count()
    print(f"storm: {n} requests, upstream a saw {seen_a} attempts ({seen_a / n:.2f} per request) in {elapsed:.1f} s")
    assert n <= seen_a <= 1.2 * n + 3 + 3 * elapsed + 1, (seen_a, elapsed)
    assert seen_a < 2 * n  # far from the 3 x n of unbudgeted retries


async def test_hedges_under_a_slow_outage_stay_within_the_hedge_budget(make_gateway, mocks):  # noqa: F811
    """Every answer from a is slow (no first token for 3 s, hedge after 50 ms): hedges to b stay
    within 20 % of requests plus 3 a second, so a slow provider does not double the traffic.
    (3 s, not 1: a loop stalled for a second on a loaded machine must not let a win a hedge race.)"""
    a, b = await mocks(), await mocks()
    await a.faults(then={"x-mock-first-delta-ms": "3000"})
    ups = upstream_toml("a", a.base_url) + upstream_toml("b", b.base_url)
    gw = await make_gateway(routing_toml(ups, f"""
        [[routes]]
        match = "demo-slow"
        deployments = {pair(["a"])}
        fallbacks = {fallbacks(["b"])}
        hedge_after_ms = 50
        """))
    url = str(gw.make_url("/v1/chat/completions"))
    n = 60
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:

        async def one() -> tuple[int, Any]:
            body = {"model": "demo-slow", "stream": True, "messages": []}
            async with s.post(url, headers=AUTH, json=body) as r:
                await r.read()
                return r.status, r.headers.get("x-gateway-upstream")

        got = await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.monotonic() - t0
    assert all(status == 200 for status, _ in got)
    hedged = await b.count()
    assert n == await a.count()
    print(f"hedges: {n} slow requests, {hedged} hedges in {elapsed:.1f} s")
    assert 1 <= hedged <= 0.2 * n + 3 + 3 * elapsed + 1, (hedged, elapsed)
    assert hedged == sum(1 for _, up in got if up == "b-openai")  # every hedge won: b is fast
