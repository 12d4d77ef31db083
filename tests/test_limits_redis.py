"""Shared limits in a real Redis: two in-process gateway instances, one throwaway Redis.

Each gateway is a separate app with its own limiter and Redis client, as two
hosts would be; they share nothing but Redis.  Fault tests stop, freeze
(SIGSTOP) or flush that Redis mid-traffic.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.policy.budget_rebuild import BudgetScope
from gateway.policy.principals import Principal
from tests.conftest import gateway_toml
from tests.fixtures.limits import (
    CHAT,
    HOLD,
    LIM_KEY,
    SLOW,
    actual_cost,
    chat_body,
    fire,
    limited_keys,
    post_chat,
    statuses,
    worst_case,
)

MSGS = "/v1/messages"
FAST_RECOVERY = "retry_seconds = 0.2"
# Exactness tests assert what a healthy Redis gives: a generous timeout keeps a loaded test machine
# from tripping the (separately tested) degraded path.
PATIENT = "timeout_ms = 1000"


@pytest.fixture
def with_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_url)
    return redis_url


async def two_gateways(make_gateway: Any, upstream: str, extra: str) -> list[Any]:
    return [await make_gateway(gateway_toml(upstream, extra=extra)) for _ in range(2)]


async def redis_keys(url: str, pattern: str = "*") -> dict[str, str]:
    r = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return {k: await r.type(k) for k in await r.keys(pattern)}
    finally:
        await r.aclose()


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def test_rpm_exact_across_two_instances(make_gateway: Any, mock_upstream: Any, with_redis: str) -> None:
    """rpm=6: 18 requests at once spread over two gateways -> exactly 6 served; counters live in Redis."""
    gws = await two_gateways(make_gateway, mock_upstream.base_url, limited_keys("rpm = 6", redis=PATIENT))
    answers = await fire([(g, CHAT) for g in gws], 18, LIM_KEY, chat_body())
    assert {200: 6, 429: 12} == statuses(answers)
    assert sorted(str(i) for i in range(6)) == sorted(
        a.headers["x-ratelimit-remaining-requests"] for a in answers if a.status == 200
    )
    rejected = [a for a in answers if a.status == 429]
    assert all(50_000 < int(a.headers["retry-after-ms"]) <= 60_000 for a in rejected)
    assert all("0" == a.headers["x-ratelimit-remaining-requests"] for a in rejected)
    found = await redis_keys(with_redis)
    assert {"gw:v3:{u:lim-user}:r:k:limited": "zset"} == found  # hash-tagged by user
    assert all(g.server.app[keys.LIMITER].stats.degraded == 0 for g in gws)


async def test_concurrency_and_tokens_across_instances(make_gateway: Any, mock_upstream: Any, with_redis: str) -> None:
    """max_concurrency=2 over two gateways: 2 of 10 slow requests run; tpm headers come from Redis."""
    gws = await two_gateways(make_gateway, mock_upstream.base_url, limited_keys("max_concurrency = 2, tpm = 100000", redis=PATIENT))
    answers = await fire([(g, CHAT) for g in gws], 10, LIM_KEY, chat_body(), SLOW)
    assert {200: 2, 429: 8} == statuses(answers)
    assert all("100000" == a.headers["x-ratelimit-limit-tokens"] for a in answers)
    for g in gws:  # settlement is off the hot path: wait for the leases to go back
        await g.server.app[keys.TASKS].drain(timeout=5)
    r = aioredis.Redis.from_url(with_redis)
    try:
        assert 0 == await r.zcard("gw:v3:{u:lim-user}:c:k:limited")
        buckets = await r.hgetall("gw:v3:{u:lim-user}:t:k:limited")
    finally:
        await r.aclose()
    # settled: the window holds the two requests' real tokens, not their reservations
    assert sum(int(v) for v in buckets.values()) < 2 * 130
    after = await fire([(g, CHAT) for g in gws], 2, LIM_KEY, chat_body(), SLOW)
    assert {200: 2} == statuses(after)


async def test_budget_never_overspent_across_instances(make_gateway: Any, mock_upstream: Any, with_redis: str) -> None:
    """100 requests at once over two gateways, budget fits 10 worst cases: 10 served, spend <= budget."""
    body = chat_body(100)
    budget = 10 * worst_case(body, 100) + 1
    gws = await two_gateways(make_gateway, mock_upstream.base_url, limited_keys(f"budget_usd = {budget / 1e12}", redis=PATIENT))
    answers = await fire([(g, CHAT) for g in gws], 100, LIM_KEY, body, HOLD)
    assert [0, 0] == [g.server.app[keys.LIMITER].stats.degraded for g in gws]
    assert {200: 10, 429: 90} == statuses(answers)
    assert all("false" == a.headers["x-should-retry"] for a in answers if a.status == 429)
    spent = sum(actual_cost(a.json()["usage"]) for a in answers if a.status == 200)
    assert spent <= budget
    for g in gws:
        await g.server.app[keys.TASKS].drain(timeout=5)
    r = aioredis.Redis.from_url(with_redis)
    try:
        assert str(spent).encode() == await r.hget("gw:v3:{u:lim-user}:b:k:limited:all", "v")
    finally:
        await r.aclose()


async def test_redis_stopped_mid_load_degrades_then_recovers(
    make_gateway: Any, mock_upstream: Any, with_redis: str, redis_server: Any
) -> None:
    """Redis down: no request waits past the timeout, local limits apply; Redis back: shared limits again."""
    gw = await make_gateway(
        gateway_toml(mock_upstream.base_url, extra=limited_keys("rpm = 4", redis=FAST_RECOVERY))
    )
    limiter = gw.server.app[keys.LIMITER]
    assert {200: 2} == statuses(await fire([(gw, CHAT)], 2, LIM_KEY, chat_body()))
    redis_server.stop()
    started = time.monotonic()
    down = await fire([(gw, CHAT)], 6, LIM_KEY, chat_body())
    elapsed = time.monotonic() - started
    assert {200: 4, 429: 2} == statuses(down)  # this worker's share (all of it: one worker) of rpm=4
    assert elapsed < 30  # nobody hung (a hang is forever; generous for a loaded machine): the Redis timeout is 100 ms
    assert limiter.degraded
    assert 1 == limiter.store.outages
    assert limiter.stats.degraded >= 6
    redis_server.start()  # comes back empty
    await wait_for(lambda: not limiter.degraded)
    back = await fire([(gw, CHAT)], 6, LIM_KEY, chat_body())
    assert {200: 4, 429: 2} == statuses(back)  # the shared counter again (fresh: Redis came back empty)
    assert {"gw:v3:{u:lim-user}:r:k:limited": "zset"} == await redis_keys(with_redis)


async def test_frozen_redis_costs_one_timeout_not_a_hang(
    make_gateway: Any, mock_upstream: Any, with_redis: str, redis_server: Any
) -> None:
    """A Redis that accepts but never answers (SIGSTOP): requests are served within the timeout."""
    gw = await make_gateway(
        gateway_toml(mock_upstream.base_url, extra=limited_keys("rpm = 100", redis=FAST_RECOVERY))
    )
    limiter = gw.server.app[keys.LIMITER]
    assert 200 == (await post_chat(gw, CHAT, LIM_KEY, chat_body())).status
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        answers = await fire([(gw, CHAT)], 10, LIM_KEY, chat_body())
        assert {200: 10} == statuses(answers)
        assert time.monotonic() - started < 30  # not a hang (generous for a loaded machine)
        assert limiter.degraded
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    await wait_for(lambda: not limiter.degraded)


@pytest.mark.parametrize(("mode", "status"), [("closed", 503), ("open", 200)])
async def test_failure_modes_open_and_closed(
    make_gateway: Any, mock_upstream: Any, with_redis: str, redis_server: Any, mode: str, status: int
) -> None:
    """failure_mode closed -> 503 (529 on Anthropic paths) with retry-after; open -> no limits."""
    gw = await make_gateway(
        gateway_toml(
            mock_upstream.base_url,
            extra=limited_keys("rpm = 1", redis=f'failure_mode = "{mode}"\n' + FAST_RECOVERY),
        )
    )
    redis_server.stop()
    answers = await fire([(gw, CHAT)], 3, LIM_KEY, chat_body())
    assert {status: 3} == statuses(answers)
    if mode == "closed":
        assert all("1" == a.headers["retry-after"] for a in answers)
        assert "service_unavailable" == answers[0].json()["error"]["code"]
        h = {"x-api-key": LIM_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
        async with gw.post(MSGS, data=chat_body(10, model="demo-claude"), headers=h) as r:
            assert 529 == r.status


async def test_flushed_redis_rebuilds_budgets_before_enforcing(
    make_gateway: Any, mock_upstream: Any, with_redis: str
) -> None:
    """FLUSHALL mid-period: the budget counter is rebuilt (never a fresh budget) before the next admission."""
    body = chat_body(100)
    wc = worst_case(body, 100)
    async with aiohttp.ClientSession() as s:  # what one request really costs, asked of the mock directly
        each = actual_cost((await post_chat(s, mock_upstream.base_url + CHAT, "x", body)).json()["usage"])
    # Fits 3 requests (the third needs 2 spent + a worst case); a fresh counter would admit 3 more after 2.
    budget = 2 * each + wc
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=limited_keys(f"budget_usd = {budget / 1e12}")))
    limiter = gw.server.app[keys.LIMITER]
    for _ in range(2):
        assert 200 == (await post_chat(gw, CHAT, LIM_KEY, body)).status
        await gw.server.app[keys.TASKS].drain(timeout=5)
    assert 1 == limiter.stats.rebuilds  # the first request found no counter: built from the ledger
    subprocess.run(["redis-cli", "-u", with_redis, "flushall"], check=True, capture_output=True)
    # The no-op ledger hook knows nothing; the limiter seeds from the spend it saw itself.
    answers = [await post_chat(gw, CHAT, LIM_KEY, body) for _ in range(2)]
    assert [200, 429] == [a.status for a in answers]
    assert 2 == limiter.stats.rebuilds


async def test_rebuild_takes_the_ledger_spend_on_a_fresh_instance(
    make_gateway: Any, mock_upstream: Any, with_redis: str
) -> None:
    """An instance that never saw the spend rebuilds from the ledger hook's answer."""
    body = chat_body(100)
    wc = worst_case(body, 100)
    gw = await make_gateway(gateway_toml(mock_upstream.base_url, extra=limited_keys(f"budget_usd = {10 * wc / 1e12}")))
    limiter = gw.server.app[keys.LIMITER]
    asked: list[BudgetScope] = []

    async def ledger(scopes: Any) -> dict[BudgetScope, int]:
        asked.extend(scopes)
        return dict.fromkeys(scopes, 10 * wc - wc)  # the ledger says: one worst case left

    limiter.rebuild = ledger
    answers = [await post_chat(gw, CHAT, LIM_KEY, body) for _ in range(2)]
    assert [200, 429] == [a.status for a in answers]
    assert [BudgetScope("lim-user", "limited", "total", 0.0)] == asked


async def test_daily_user_budget_counter_names_the_period(
    make_gateway: Any, mock_upstream: Any, with_redis: str
) -> None:
    """A user's daily budget lives in a per-day counter that expires; a monthly one per month."""
    gw = await make_gateway(
        gateway_toml(
            mock_upstream.base_url,
            extra=limited_keys('budget_usd = 5.0, budget_period = "month"', user_limits='budget_usd = 1.0, budget_period = "day"'),
        )
    )
    assert 200 == (await post_chat(gw, CHAT, LIM_KEY, chat_body())).status
    day = time.strftime("%Y%m%d", time.gmtime())
    found = await redis_keys(with_redis)
    assert {f"gw:v3:{{u:lim-user}}:b:u:d{day}", f"gw:v3:{{u:lim-user}}:b:k:limited:m{day[:6]}"} == set(found)
    r = aioredis.Redis.from_url(with_redis)
    try:
        assert 0 < await r.ttl(f"gw:v3:{{u:lim-user}}:b:u:d{day}") <= 2 * 86_400
    finally:
        await r.aclose()


async def test_admission_cancelled_mid_flight_gives_its_reservation_back(redis_url: str) -> None:
    """A request cancelled (client gone) after its script was sent: the lease and budget return at once."""
    from gateway.accounting.pricing import PriceTable
    from gateway.config import Limits, parse
    from gateway.policy.admit import RequestFacts
    from gateway.policy.limits import RedisLimiter
    from gateway.stores.redis import RedisStore
    from tests.conftest import CONFIG_DIR

    cfg = parse("", source=str(CONFIG_DIR / "test.toml"))

    async def no_ledger(scopes: Any) -> None:
        return None

    limiter = RedisLimiter(cfg, RedisStore(cfg.redis, redis_url), PriceTable.load(cfg), rebuild=no_ledger)
    await limiter.start()
    p = Principal("k1", "k1", "k1", "u1", key_limits=Limits(max_concurrency=1, budget_usd=1.0))
    facts = RequestFacts("demo-gpt", False, 100, 200, "127.0.0.1", "req_warm")
    held = await limiter.reserve(p, facts)  # builds the budget counter
    await limiter.settle(p, facts, held, 0, 0)
    task = asyncio.ensure_future(limiter.reserve(p, RequestFacts("demo-gpt", False, 100, 200, "127.0.0.1", "req_gone")))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the script is on the wire, its reply not yet read
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    r = aioredis.Redis.from_url(redis_url)
    try:
        await wait_until(lambda: r.zcard("gw:v3:{u:u1}:c:k:k1"), 0)
        await wait_until(lambda: r.hget("gw:v3:{u:u1}:b:k:k1:all", "r"), b"0")  # nothing held
        assert b"0" == await r.hget("gw:v3:{u:u1}:b:k:k1:all", "v")  # nothing spent
    finally:
        await r.aclose()
        await limiter.close()


async def wait_until(probe: Any, expected: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (value := await probe()) != expected:
        assert time.monotonic() < deadline, f"{value!r} != {expected!r}"
        await asyncio.sleep(0.02)


async def test_outage_local_budget_starts_from_the_ledger(
    make_gateway: Any, mock_upstream: Any, with_redis: str, redis_server: Any
) -> None:
    """Redis down on a worker that never saw a budget's spend: the local share starts from the ledger's spend."""
    body = chat_body(100)
    wc = worst_case(body, 100)
    gw = await make_gateway(
        gateway_toml(mock_upstream.base_url, extra=limited_keys(f"budget_usd = {10 * wc / 1e12}", redis=FAST_RECOVERY))
    )
    limiter = gw.server.app[keys.LIMITER]

    async def ledger(scopes: Any) -> dict[BudgetScope, int]:
        return dict.fromkeys(scopes, 9 * wc)  # one worst case left

    limiter.rebuild = ledger
    redis_server.stop()
    answers = [await post_chat(gw, CHAT, LIM_KEY, body) for _ in range(2)]
    assert [200, 429] == [a.status for a in answers]
    assert limiter.degraded
