"""Hedging: when the first attempt has no first token after hedge_after_ms, a second starts on the
next deployment; the first to produce a token wins, the other connection is closed, and the
usage the loser reported lands in the same (one) usage record.  Also the strategies that order a
route's deployments (least_busy, latency), through real requests."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest

from gateway.config import parse
from gateway.proxy.routing import Router, build_upstreams
from gateway.proxy.strategies import latency, least_busy, weighted
from tests.conftest import TEST_KEY
from tests.fixtures.routing import (  # noqa: F401 - fixture
    MESSAGES,
    fallbacks,
    mocks,
    pair,
    routing_toml,
    sdk_call,
    upstream_toml,
)
from tests.test_ledger_gateway import cost, mock_input_tokens, wait_rows

AUTH = {"anthropic": {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"},
        "openai": {"authorization": f"Bearer {TEST_KEY}"}}
PATH = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}


def hedge_toml(a: str, b: str, journal: Any, hedge_ms: int = 100) -> str:
    ups = upstream_toml("a", a) + upstream_toml("b", b)
    return routing_toml(ups, f"""
        [[routes]]
        match = "demo-h"
        deployments = {pair(["a"])}
        fallbacks = {fallbacks(["b"])}
        hedge_after_ms = {hedge_ms}
        """, f'[accounting]\njournal_dir = "{journal}"\nflush_ms = 50\n')


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
async def test_hedge_wins_when_the_first_attempt_is_slow_and_the_loser_is_closed(
        make_gateway, mocks, pg_env, tmp_path, dialect):  # noqa: F811
    """a sends its opening events at once and its first token after 5 s; after 100 ms the hedge
    starts on b, which answers at once and wins.  a's connection is closed (its stream cancelled),
    the client sees one clean stream from b, and there is one usage record: b's answer plus what a
    reported before it was dropped (Anthropic's message_start: input tokens, output_tokens 1)."""
    a, b = await mocks(), await mocks()
    await a.faults(then={"x-mock-first-delta-ms": "5000"})
    gw = await make_gateway(hedge_toml(a.base_url, b.base_url, tmp_path))
    base = str(gw.make_url("")).rstrip("/")
    out = await sdk_call(base, dialect, "demo-h", stream=True)
    assert (200, None, "lorem " * 5) == (out.status, out.error, out.text)
    assert (f"b-{dialect}", "2") == (out.headers["x-gateway-upstream"], out.headers["x-gateway-attempts"])
    assert (1, 1) == (await a.count(), await b.count())

    async def a_closed() -> bool:
        return (await a.count("streams_cancelled")) == 1

    await wait_for(a_closed)
    assert 0 == await a.count("streams_completed")
    rows = await wait_rows(pg_env, 1)
    assert 1 == len(rows)
    row = rows[out.request_id]
    assert ("b-" + dialect, False, 200) == (row["upstream"], row["partial"], row["status"])
    one = mock_input_tokens({"messages": MESSAGES})  # what one attempt reports as input
    if dialect == "anthropic":
        assert (2 * one, 6) == (row["input_tokens"], row["output_tokens"])
        assert cost(one, 5) + cost(one, 1) == row["cost_pico"]
    else:  # an OpenAI stream reports usage only at its end: the loser reported none
        assert (one, 5, cost(one, 5)) == (row["input_tokens"], row["output_tokens"], row["cost_pico"])


async def test_first_attempt_wins_when_its_token_comes_before_the_hedges(make_gateway, mocks, pg_env, tmp_path):  # noqa: F811
    """a's first token comes after 400 ms, the hedge (after 100 ms) on b would take 5 s: a wins, b's
    connection is closed, and b's reported message_start usage is recorded with a's answer."""
    a, b = await mocks(), await mocks()
    await a.faults(then={"x-mock-first-delta-ms": "400"})
    await b.faults(then={"x-mock-first-delta-ms": "5000"})
    gw = await make_gateway(hedge_toml(a.base_url, b.base_url, tmp_path))
    out = await sdk_call(str(gw.make_url("")).rstrip("/"), "anthropic", "demo-h", stream=True)
    assert (200, None, "a-anthropic") == (out.status, out.error, out.headers["x-gateway-upstream"])

    async def b_closed() -> bool:
        return (await b.count("streams_cancelled")) == 1

    await wait_for(b_closed)
    row = (await wait_rows(pg_env, 1))[out.request_id]
    assert 6 == row["output_tokens"]


async def test_no_hedge_when_the_first_token_comes_in_time(make_gateway, mocks, pg_env, tmp_path):  # noqa: F811
    a, b = await mocks(), await mocks()
    gw = await make_gateway(hedge_toml(a.base_url, b.base_url, tmp_path, hedge_ms=3000))
    for dialect in ("anthropic", "openai"):
        out = await sdk_call(str(gw.make_url("")).rstrip("/"), dialect, "demo-h", stream=True)
        assert ("1", f"a-{dialect}") == (out.headers["x-gateway-attempts"], out.headers["x-gateway-upstream"])
    assert (2, 0) == (await a.count(), await b.count())


async def test_a_hedge_is_reserved_against_the_keys_budget(make_gateway, mocks, tmp_path):  # noqa: F811
    """A key whose budget covers one worst case but not two: the hedge is not started (its reservation
    is refused) and the slow first attempt serves; without the budget limit the hedge goes."""
    a, b = await mocks(), await mocks()
    await a.faults(then={"x-mock-first-delta-ms": "600"})
    # One worst case (~23 input tokens at 3.75 + 10 output at 15 per Mtok: ~236 micro-dollars) fits, two
    # do not; one worker, so that the local limiter's share is the whole budget.
    text = hedge_toml(a.base_url, b.base_url, tmp_path).replace(
        'name = "test"\n', 'name = "test"\nlimits = { budget_usd = 0.0004, budget_period = "day" }\n', 1,
    ).replace("port = 0\n", "port = 0\nworkers = 1\n", 1)
    gw = await make_gateway(text)
    url = str(gw.make_url("/v1/chat/completions"))
    body = {"model": "demo-h", "stream": True, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s, s.post(url, headers=AUTH["openai"], json=body) as r:
        await r.read()
        assert 200 == r.status
        assert ("a-openai", "1") == (r.headers["x-gateway-upstream"], r.headers["x-gateway-attempts"])
    assert 0 == await b.count()


# ------------------------------------------------------------------ strategies


async def test_latency_strategy_prefers_the_upstream_with_the_faster_first_token(make_gateway, mocks):  # noqa: F811
    """a takes 300 ms to its first token, b none: once each was measured (an unmeasured upstream goes
    first), every request goes to b.  a sees exactly one request out of ten."""
    a, b = await mocks(), await mocks()
    await a.faults(then={"x-mock-ttft-ms": "300"})
    ups = upstream_toml("a", a.base_url) + upstream_toml("b", b.base_url)
    gw = await make_gateway(routing_toml(ups, f"""
        [[routes]]
        match = "demo-l"
        strategy = "latency"
        deployments = {pair(["a", "b"])}
        """))
    url = str(gw.make_url("/v1/chat/completions"))
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            body = {"model": "demo-l", "stream": True, "messages": []}
            async with s.post(url, headers=AUTH["openai"], json=body) as r:
                await r.read()
                assert 200 == r.status
    assert (1, 9) == (await a.count(), await b.count())


async def test_least_busy_strategy_sends_the_next_request_to_the_idle_upstream(make_gateway, mocks):  # noqa: F811
    """With one long stream in flight on one upstream, the next request goes to the other, whatever
    the weights say (a's weight is 100)."""
    a, b = await mocks(), await mocks()
    ups = upstream_toml("a", a.base_url) + upstream_toml("b", b.base_url)
    gw = await make_gateway(routing_toml(ups, """
        [[routes]]
        match = "demo-lb"
        strategy = "least_busy"
        deployments = [{ upstream = "a-openai", weight = 100 }, { upstream = "b-openai", weight = 1 }]
        """))
    url = str(gw.make_url("/v1/chat/completions"))
    async with aiohttp.ClientSession() as s:
        slow = {"model": "demo-lb", "stream": True, "messages": []}
        first = await s.post(url, headers={**AUTH["openai"], "x-mock-chunk-gap-ms": "300"}, json=slow)
        busy = first.headers["x-gateway-upstream"]
        for _ in range(3):
            async with s.post(url, headers=AUTH["openai"], json={"model": "demo-lb", "messages": []}) as r:
                await r.read()
                assert busy != r.headers["x-gateway-upstream"]
        await first.read()
        first.release()


def _router(strategy: str) -> Router:
    ups = "".join(f'[upstreams.{n}]\nprovider = "openai"\nbase_url = "http://127.0.0.1:1"\n' for n in "xyz")
    cfg = parse(ups + f'[[routes]]\nmatch = "m"\nstrategy = "{strategy}"\n'
                'deployments = [{ upstream = "x", weight = 1 }, { upstream = "y", weight = 1 }, '
                '{ upstream = "z", weight = 1 }]\n', environ={})
    return Router(cfg, build_upstreams(cfg))


def test_strategies_table():
    """Every strategy returns each deployment exactly once; least_busy orders by in-flight count;
    latency puts the faster of any two drawn first and measured ones by EWMA after it."""
    rnd = random.Random(7)
    for strategy, fn in (("weighted", weighted), ("least_busy", least_busy), ("latency", latency)):
        plan = _router(strategy).plan("m", "openai")
        for _ in range(50):
            got = fn(plan.primary, rnd)
            assert sorted(d.name for d in plan.primary) == sorted(d.name for d in got)
    plan = _router("least_busy").plan("m", "openai")
    x, y, z = plan.primary
    x.upstream.stats.inflight, y.upstream.stats.inflight, z.upstream.stats.inflight = 5, 0, 2
    assert [["y", "z", "x"]] * 20 == [[d.name for d in least_busy(plan.primary, rnd)] for _ in range(20)]
    plan = _router("latency").plan("m", "openai")
    x, y, z = plan.primary
    for dep, s in ((x, 0.9), (y, 0.1), (z, 0.5)):
        dep.upstream.stats.observe_ttft(s)
    orders = [[d.name for d in latency(plan.primary, rnd)] for _ in range(200)]
    assert all(o[0] != "x" for o in orders)  # the slowest never wins a draw of two
    assert {"y", "z"} == {o[0] for o in orders}  # z first only when the two drawn were x and z
    assert all(o[1:] == sorted(o[1:], key=lambda n: {"x": 0.9, "y": 0.1, "z": 0.5}[n]) for o in orders)


def test_ewma_of_time_to_first_token():
    plan = _router("latency").plan("m", "openai")
    stats = plan.primary[0].upstream.stats
    stats.observe_ttft(1.0)
    assert 1.0 == stats.ttft_ewma
    stats.observe_ttft(2.0)
    assert abs(1.2 - stats.ttft_ewma) < 1e-9


@pytest.mark.parametrize("store", ["redis", "local"])
async def test_a_hedges_hold_is_released_when_the_request_settles(
        make_gateway, mocks, tmp_path, store, request, monkeypatch):  # noqa: F811
    """max_concurrency = 2: a hedged request holds two slots (its own and the hedge's) while in flight.
    Both are given back when it ends, or the next hedged request would be refused at admission."""
    if store == "redis":
        monkeypatch.setenv("GATEWAY_REDIS_URL", request.getfixturevalue("redis_url"))
    a, b = await mocks(), await mocks()
    await a.faults(then={"x-mock-first-delta-ms": "500"})
    text = hedge_toml(a.base_url, b.base_url, tmp_path, hedge_ms=50).replace(
        'name = "test"\n', 'name = "test"\nlimits = { max_concurrency = 2 }\n', 1,
    ).replace("port = 0\n", "port = 0\nworkers = 1\n", 1)
    gw = await make_gateway(text)
    url = str(gw.make_url("/v1/chat/completions"))
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            body = {"model": "demo-h", "stream": True, "messages": []}
            async with s.post(url, headers=AUTH["openai"], json=body) as r:
                await r.read()
                assert 200 == r.status
                assert ("b-openai", "2") == (r.headers["x-gateway-upstream"], r.headers["x-gateway-attempts"])
    assert (4, 4) == (await a.count(), await b.count())
