"""Settlements and budget applications batched into one script call each, in a real Redis.

The handler hands a finished request's settlement to the limiter (``settle_later``): those of one
loop pass go as one SETTLE_MANY; a committed ledger batch's costs go as one APPLY_MANY.  Each must
leave exactly the counters that one SETTLE / APPLY per request leaves.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from gateway.accounting.ledger import decode, encode
from gateway.accounting.pricing import PriceTable
from gateway.accounting.record import UsageRecord
from gateway.config import Limits, parse
from gateway.policy import limits
from gateway.policy.admit import Admitter, RequestFacts
from gateway.policy.limits import RedisLimiter
from gateway.policy.plans import duration
from gateway.policy.principals import Principal
from gateway.stores.redis import RedisStore
from tests.conftest import CONFIG_DIR

COUNTERS = "gw:v3:{u:u1}"


async def _limiter(redis_url: str) -> RedisLimiter:
    cfg = parse("", source=str(CONFIG_DIR / "test.toml"))

    async def no_ledger(scopes: Any) -> None:
        return None

    limiter = RedisLimiter(cfg, RedisStore(cfg.redis, redis_url), PriceTable.load(cfg), rebuild=no_ledger)
    await limiter.start()
    return limiter


def _record(rid: str, cost: int, budget_keys: tuple[str, ...]) -> UsageRecord:
    return UsageRecord(
        request_id=rid, ts=1.0, key_id="k1", user_id="u1", model="demo-gpt", route="", upstream="", status=200,
        streamed=False, partial=False, input_tokens=1, output_tokens=1, cache_write_tokens=0, cache_read_tokens=0,
        cost_pico=cost, priced=True, upstream_ms=1.0, ttft_ms=None, gateway_ms=0.1, budget_keys=budget_keys,
    )


async def test_one_loop_pass_of_settlements_is_one_call_and_leaves_what_each_would(redis_url: str) -> None:
    """Eight requests settled in one loop pass: one SETTLE_MANY; leases released, each second's tokens
    moved to the real count, each budget reservation turned into its real cost, held for the ledger;
    then one APPLY_MANY moves the committed costs into the counter and drops the holds."""
    limiter = await _limiter(redis_url)
    limiter.attach_ledger()
    admitter = Admitter(limiter)
    p = Principal("k1", "k1", "k1", "u1", key_limits=Limits(max_concurrency=20, tpm=10_000_000, budget_usd=1000.0))
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        facts = [RequestFacts("demo-gpt", False, 100, 400, "127.0.0.1", f"req batch {i}") for i in range(8)]
        held = [await admitter.admit(p, f) for f in facts]
        assert 8 == await r.zcard(f"{COUNTERS}:c:k:k1")
        budget = f"{COUNTERS}:b:k:k1:all"
        assert 0 < int(await r.hget(budget, "r"))
        batches = limiter.stats.settle_batches
        for i, (f, res) in enumerate(zip(facts, held, strict=True)):
            admitter.settle_later(p, f, res, 10 + i, 1_000_000 * (i + 1))
        await limiter.flush_settlements()
        assert batches + 1 == limiter.stats.settle_batches, "one script call for the loop pass"
        assert 0 == await r.zcard(f"{COUNTERS}:c:k:k1")
        assert sum(10 + i for i in range(8)) == sum(int(v) for v in (await r.hgetall(f"{COUNTERS}:t:k:k1")).values())
        fields = await r.hgetall(budget)
        assert {f"p:req batch {i}": str(1_000_000 * (i + 1)) for i in range(8)} == \
            {k: v for k, v in fields.items() if k.startswith("p:")}
        assert sum(1_000_000 * (i + 1) for i in range(8)) == int(fields["r"])
        assert "0" == fields["v"]

        records = [decode(encode(_record(f.request_id, 1_000_000 * (i + 1), (budget,)))) for i, f in enumerate(facts)]
        assert all(rec is not None and (budget,) == rec.budget_keys for rec in records)
        await limiter.apply_committed([rec for rec in records if rec is not None], "123")
        fields = await r.hgetall(budget)
        assert str(sum(1_000_000 * (i + 1) for i in range(8))) == fields["v"]
        assert "0" == fields["r"]
        assert not [k for k in fields if k[:2] in ("p:", "h:", "e:")]
    finally:
        await r.aclose()
        await limiter.close()


async def test_settlements_queued_at_close_are_sent(redis_url: str) -> None:
    """A settlement handed over just before shutdown is not lost: close() sends it and waits for it."""
    limiter = await _limiter(redis_url)
    admitter = Admitter(limiter)
    p = Principal("k1", "k1", "k1", "u1", key_limits=Limits(max_concurrency=5))
    r = aioredis.Redis.from_url(redis_url)
    try:
        f = RequestFacts("demo-gpt", False, 100, 400, "127.0.0.1", "req_last")
        res = await admitter.admit(p, f)
        assert 1 == await r.zcard(f"{COUNTERS}:c:k:k1")
        admitter.settle_later(p, f, res, 5, 0)
        await limiter.close()
        assert 0 == await r.zcard(f"{COUNTERS}:c:k:k1")
    finally:
        await r.aclose()


def test_reset_durations_read_as_before() -> None:
    """duration() without rstrip gives OpenAI's format exactly as the general formatting does."""
    def reference(ms: float) -> str:
        if ms < 1000:
            return f"{max(0, ms)}ms"
        if ms < 60_000:
            return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
        minutes, rest = divmod(ms, 60_000)
        return f"{minutes}m" + f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"

    for ms in [*range(-1500, 130_000), 10**9 + 7]:
        assert reference(ms) == duration(ms), ms
    for ms in (0.0, 250.5, 1500.25, 61000.0, -3.0, 59999.9996):
        assert reference(ms) == duration(ms), ms




async def test_a_settlement_rides_on_the_next_admit_and_goes_first(redis_url: str, monkeypatch: Any) -> None:
    """On a busy worker a settlement handed over is sent with the next ADMIT, ahead of it in the same
    write: the lease it releases and the budget hold it shrinks are free for that very ADMIT.  (The
    timer that would send it alone is pushed out of the test's reach: only the ADMIT can carry it.)"""
    monkeypatch.setattr(limits, "BUSY_ADMITS_PER_S", 0)  # any rate counts as busy
    monkeypatch.setattr(limits, "SETTLE_WAIT_S", 60.0)
    limiter = await _limiter(redis_url)
    limiter.attach_ledger()
    admitter = Admitter(limiter)
    first = RequestFacts("demo-gpt", False, 100, 400, "127.0.0.1", "req_first")
    # One lease, and a budget for one worst case and a little: the second request fits only once the
    # first one's hold shrank to its real cost (1,000 pico-dollars).
    worst = demand_cost(limiter, first)
    p = Principal("k1", "k1", "k1", "u1", key_limits=Limits(max_concurrency=1, budget_usd=(worst + 10_000) / 10**12))
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        res = await admitter.admit(p, first)
        budget = f"{COUNTERS}:b:k:k1:all"
        assert str(worst) == await r.hget(budget, "r")
        batches = limiter.stats.settle_batches
        admitter.settle_later(p, first, res, 10, 1_000)
        await asyncio.sleep(0.05)  # loop passes go by: nothing is sent without an ADMIT (or the timer)
        assert ["req_first"] == await r.zrange(f"{COUNTERS}:c:k:k1", 0, -1)
        assert batches == limiter.stats.settle_batches

        second = RequestFacts("demo-gpt", False, 100, 400, "127.0.0.1", "req_second")
        res2 = await admitter.admit(p, second)  # would be a 429 (lease and budget) had it gone first
        assert ["req_second"] == await r.zrange(f"{COUNTERS}:c:k:k1", 0, -1)
        fields = await r.hgetall(budget)
        assert "1000" == fields["p:req_first"]  # the real cost, held for the ledger
        assert str(worst + 1_000) == fields["r"]
        assert batches + 1 == limiter.stats.settle_batches
        admitter.settle_later(p, second, res2, 10, 1_000)
        await limiter.flush_settlements()
        assert 0 == await r.zcard(f"{COUNTERS}:c:k:k1")
    finally:
        await r.aclose()
        await limiter.close()


async def test_a_settlement_without_a_following_admit_is_sent_by_the_timer(redis_url: str, monkeypatch: Any) -> None:
    """Busy, but no ADMIT comes: the settlement goes alone ``SETTLE_WAIT_S`` later (the lease is back within ms)."""
    monkeypatch.setattr(limits, "BUSY_ADMITS_PER_S", 0)
    limiter = await _limiter(redis_url)
    admitter = Admitter(limiter)
    p = Principal("k1", "k1", "k1", "u1", key_limits=Limits(max_concurrency=5))
    r = aioredis.Redis.from_url(redis_url)
    try:
        f = RequestFacts("demo-gpt", False, 100, 400, "127.0.0.1", "req_alone")
        res = await admitter.admit(p, f)
        admitter.settle_later(p, f, res, 5, 0)
        deadline = time.monotonic() + 5
        while await r.zcard(f"{COUNTERS}:c:k:k1"):
            assert time.monotonic() < deadline, "the settlement was never sent"
            await asyncio.sleep(limits.SETTLE_WAIT_S)
        assert 1 == limiter.stats.settle_batches
    finally:
        await r.aclose()
        await limiter.close()


async def test_a_quiet_worker_sends_a_settlement_at_once(redis_url: str, monkeypatch: Any) -> None:
    """Below the busy rate nothing waits for an ADMIT: the lease is back after a loop pass or two."""
    monkeypatch.setattr(limits, "SETTLE_WAIT_S", 60.0)
    limiter = await _limiter(redis_url)
    admitter = Admitter(limiter)
    p = Principal("k1", "k1", "k1", "u1", key_limits=Limits(max_concurrency=5))
    r = aioredis.Redis.from_url(redis_url)
    try:
        f = RequestFacts("demo-gpt", False, 100, 400, "127.0.0.1", "req_quiet")
        res = await admitter.admit(p, f)
        admitter.settle_later(p, f, res, 5, 0)
        # Sent at once: back well before the 60 s timer (waited for, not assumed after a few loop passes).
        deadline = time.monotonic() + 10
        while await r.zcard(f"{COUNTERS}:c:k:k1"):
            assert time.monotonic() < deadline, "the settlement waited for the timer"
            await asyncio.sleep(0.01)
    finally:
        await r.aclose()
        await limiter.close()


def demand_cost(limiter: RedisLimiter, facts: RequestFacts) -> int:
    """The worst-case cost ADMIT reserves for ``facts`` (no limit caps its output)."""
    price = limiter.prices.lookup(facts.model) or limiter.prices.default
    assert price is not None and facts.max_tokens is not None
    return price.worst_case_pico(facts.est_input_tokens, facts.max_tokens)


def _ms(text: str) -> int:
    """OpenAI's reset format (``250ms``, ``1.5s``, ``1m0s``) back to milliseconds."""
    if text.endswith("ms"):
        return int(text[:-2])
    minutes, _, secs = text[:-1].rpartition("m")
    return int(minutes or 0) * 60_000 + round(float(secs) * 1000)


async def test_rate_headers_read_from_the_admit_answer_match_the_counters(redis_url: str) -> None:
    """The x-ratelimit-* of an admission, read from ADMIT's answer in place: each limit as configured,
    what is left in Redis after this request, and a reset within the minute written in OpenAI's format;
    with a key and a user limit of one kind, the tighter one is reported."""
    limiter = await _limiter(redis_url)
    admitter = Admitter(limiter)
    single = Principal("k1", "k1", "k1", "u1", key_limits=Limits(rpm=7, tpm=50_000))
    both = Principal("k2", "k2", "k2", "u1", key_limits=Limits(rpm=7, tpm=50_000), user_limits=Limits(rpm=5))
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for i in range(3):
            res = await admitter.admit(single, RequestFacts("demo-gpt", False, 100, 400, "127.0.0.1", f"req_h{i}"))
            h = res.headers
            used_tokens = sum(int(v) for v in (await r.hgetall(f"{COUNTERS}:t:k:k1")).values())
            assert "7" == h["x-ratelimit-limit-requests"]
            assert str(7 - await r.zcard(f"{COUNTERS}:r:k:k1")) == h["x-ratelimit-remaining-requests"]
            assert "50000" == h["x-ratelimit-limit-tokens"]
            assert str(50_000 - used_tokens) == h["x-ratelimit-remaining-tokens"]
            for kind in ("requests", "tokens"):
                text = h[f"x-ratelimit-reset-{kind}"]
                assert 0 < _ms(text) <= 60_000
                assert duration(_ms(text)) == text
            await asyncio.sleep(0.011)  # the next answer's resets fall inside the minute, off whole seconds
        res = await admitter.admit(both, RequestFacts("demo-gpt", False, 100, 400, "127.0.0.1", "req_both"))
        assert "5" == res.headers["x-ratelimit-limit-requests"]  # the user's 5 beats the key's 7
        assert str(5 - await r.zcard(f"{COUNTERS}:r:u")) == res.headers["x-ratelimit-remaining-requests"]
        assert "50000" == res.headers["x-ratelimit-limit-tokens"]
    finally:
        await r.aclose()
        await limiter.close()


async def test_a_settlement_batch_refused_for_a_lost_script_is_sent_again(redis_url: str) -> None:
    """Redis lost its scripts (restart, SCRIPT FLUSH) between an admission and its settlement: the
    batch's NOSCRIPT answer sends it again by EVAL; an awaited ``settle`` returns once that is done and
    ``flush_settlements`` waits for it too; the lease is back and nothing is parked."""
    limiter = await _limiter(redis_url)
    admitter = Admitter(limiter)
    p = Principal("k1", "k1", "k1", "u1", key_limits=Limits(max_concurrency=5))
    r = aioredis.Redis.from_url(redis_url)
    try:
        f1 = RequestFacts("demo-gpt", False, 100, 400, "127.0.0.1", "req_noscript_1")
        f2 = RequestFacts("demo-gpt", False, 100, 400, "127.0.0.1", "req_noscript_2")
        res1, res2 = await admitter.admit(p, f1), await admitter.admit(p, f2)
        assert 2 == await r.zcard(f"{COUNTERS}:c:k:k1")
        await r.script_flush()
        await limiter.settle(p, f1, res1, 5, 0)
        assert 1 == await r.zcard(f"{COUNTERS}:c:k:k1")
        admitter.settle_later(p, f2, res2, 5, 0)
        await limiter.flush_settlements()
        assert 0 == await r.zcard(f"{COUNTERS}:c:k:k1")
        assert 0 == limiter.stats.parked
    finally:
        await r.aclose()
        await limiter.close()
