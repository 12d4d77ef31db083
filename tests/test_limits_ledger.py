"""Budgets with a ledger: the Redis counter always equals what Postgres committed, plus what is held.

Database mode with Redis: keys and their budgets come from the admin API,
usage records go journal -> Postgres, and each committed record's cost moves
into its budget counter (stores/redis_scripts.py APPLY).  These tests stop,
flush and freeze Redis and kill workers, then compare the counter with
``sum(cost_pico)`` in ``usage_ledger``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.policy.plans import scope_of
from tests.conftest import gateway_toml
from tests.fixtures.control_plane import ADMIN, ADMIN_TOKEN, JWT_SECRET, create_key, create_user
from tests.fixtures.limits import CHAT, HOLD, chat_body, fire, post_chat, statuses, worst_case
from tests.test_limits_process import workers_of


def ledger_toml(upstream: str, journal: Path, flush_ms: int, redis: str = "", workers: int = 1) -> str:
    return gateway_toml(upstream, workers=workers, extra=f"""
        [accounting]
        journal_dir = "{journal}"
        flush_ms = {flush_ms}
        batch_size = 500

        [redis]
        timeout_ms = 1000
        retry_seconds = 0.2
        {redis}
        """)


async def ledger_spend(dsn: str, key_id: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT coalesce(sum(cost_pico), 0) FROM usage_ledger WHERE key_id = $1", key_id))
    finally:
        await conn.close()


async def counter(url: str, key_id: str) -> dict[str, str]:
    """The key's budget counter (total period) as Redis holds it."""
    r = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        found = list(await r.keys(f"*:b:k:{key_id}:all"))
        assert len(found) == 1, found
        return await r.hgetall(found[0])  # type: ignore[no-any-return]
    finally:
        await r.aclose()


def holds(c: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in c.items() if k[:2] in ("h:", "p:", "e:", "q:")}


async def budget_key(client: Any, budget_usd: float) -> tuple[str, str]:
    user = await create_user(client, f"budget-{os.urandom(3).hex()}@example.com")
    key = await create_key(client, user["id"], limits={"budget_usd": budget_usd})
    return key["id"], key["key"]


@pytest.fixture
def with_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_url)
    return redis_url


async def settle(gw: Any) -> None:
    """Every request's settlement sent, every record committed (and so applied)."""
    await gw.server.app[keys.TASKS].drain(timeout=5)
    await gw.server.app[keys.USAGE].flush()


async def test_counter_is_the_ledger_plus_holds_and_settles_exactly(
    make_gateway: Any, mock_upstream: Any, pg_env: str, with_redis: str, tmp_path: Path
) -> None:
    """Before the commit the settled cost is held (p:<id>); after it, the counter's v is the ledger's sum."""
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path, flush_ms=60_000))
    key_id, key = await budget_key(gw, 10.0)
    for _ in range(3):
        assert 200 == (await post_chat(gw, CHAT, key, chat_body())).status
    await gw.server.app[keys.TASKS].drain(timeout=5)
    before = await counter(with_redis, key_id)
    assert "0" == before["v"]  # nothing committed yet: the ledger was empty when the counter was built
    pending = [int(v) for k, v in before.items() if k.startswith("p:")]
    assert 3 == len(pending) and sum(pending) == int(before["r"])  # real costs, still held
    assert 0 == await ledger_spend(pg_env, key_id)
    await settle(gw)
    after = await counter(with_redis, key_id)
    spent = await ledger_spend(pg_env, key_id)
    assert spent == sum(pending) > 0
    assert (str(spent), "0", {}) == (after["v"], after["r"], holds(after))


async def test_flushed_redis_rebuilds_from_ledger_and_journals_without_double_counting(
    make_gateway: Any, mock_upstream: Any, pg_env: str, with_redis: str, tmp_path: Path
) -> None:
    """Part of the spend committed, part still in the journal when Redis is flushed: the rebuilt
    counter takes the committed part from the ledger and the rest when it commits, each once."""
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path, flush_ms=60_000))
    key_id, key = await budget_key(gw, 10.0)
    for _ in range(3):
        assert 200 == (await post_chat(gw, CHAT, key, chat_body())).status
    await settle(gw)  # three committed and applied
    for _ in range(4):
        assert 200 == (await post_chat(gw, CHAT, key, chat_body())).status
    await gw.server.app[keys.TASKS].drain(timeout=5)  # four settled, still in the journal
    subprocess.run(["redis-cli", "-u", with_redis, "flushall"], check=True, capture_output=True)
    limiter = gw.server.app[keys.LIMITER]
    rebuilds = limiter.stats.rebuilds
    assert 200 == (await post_chat(gw, CHAT, key, chat_body())).status  # rebuilds from the ledger first
    assert rebuilds + 1 == limiter.stats.rebuilds
    rebuilt = await counter(with_redis, key_id)
    assert "s" in rebuilt  # the snapshot the ledger was read in
    await settle(gw)
    final = await counter(with_redis, key_id)
    spent = await ledger_spend(pg_env, key_id)
    assert (str(spent), "0", {}) == (final["v"], final["r"], holds(final))
    conn = await asyncpg.connect(pg_env)
    try:
        assert 8 == await conn.fetchval("SELECT count(*) FROM usage_ledger WHERE key_id = $1", key_id)
    finally:
        await conn.close()


async def test_commit_while_redis_is_frozen_is_applied_when_it_answers(
    make_gateway: Any, mock_upstream: Any, pg_env: str, with_redis: str, redis_server: Any, tmp_path: Path
) -> None:
    """Records committed while Redis does not answer: their costs reach the counter once it does."""
    gw = await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path, flush_ms=60_000))
    key_id, key = await budget_key(gw, 10.0)
    for _ in range(4):
        assert 200 == (await post_chat(gw, CHAT, key, chat_body())).status
    await gw.server.app[keys.TASKS].drain(timeout=5)
    limiter = gw.server.app[keys.LIMITER]
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        await gw.server.app[keys.USAGE].flush()  # committed; the application times out and waits
        assert limiter.degraded
        assert limiter.budgets.stale  # the counters to rebase once Redis answers
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 30
    while limiter.degraded or limiter.budgets.stale:
        assert time.monotonic() < deadline
        # the limiter notices Redis is back on its next call
        await post_chat(gw, CHAT, key, chat_body())
        await asyncio.sleep(0.1)
    assert limiter.stats.rebases >= 1  # rebased on the ledger, not retried (a retry could count twice)
    await settle(gw)
    final = await counter(with_redis, key_id)
    spent = await ledger_spend(pg_env, key_id)
    assert (str(spent), "0", {}) == (final["v"], final["r"], holds(final))


@pytest.mark.slow
async def test_budget_reservation_of_a_killed_worker_lapses(
    serve: Any, mock_upstream: Any, db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A budget that fits one worst case, held by a request whose worker is SIGKILLed: refused while
    held, admitted again once the dead worker's reservation lapsed (it used to stay held forever)."""
    env = {
        "GATEWAY_DATABASE_URL": db_url, "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "GATEWAY_JWT_SECRET": JWT_SECRET,
    }
    toml = ledger_toml(mock_upstream.base_url, tmp_path / "journal", flush_ms=100, redis="lease_seconds = 2.0", workers=2)
    gw = serve(toml, workers=2, env=env)
    body = chat_body(100)
    wc = worst_case(body, 100)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/admin/users", headers=ADMIN, json={"email": "killed@example.com"}) as r:
            assert 201 == r.status, await r.text()
            user = await r.json()
        async with s.post(
            gw.base_url + "/admin/keys", headers=ADMIN,
            json={"user_id": user["id"], "limits": {"budget_usd": (wc + wc // 2) / 1e12}},
        ) as r:
            assert 201 == r.status, await r.text()
            created = await r.json()
        url = gw.base_url + CHAT
        slow = asyncio.ensure_future(post_chat(s, url, created["key"], body, {"x-mock-latency-ms": "30000"}))
        deadline = time.monotonic() + 10
        while (await mock_upstream.stats()).get("requests", 0) < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(3.0)  # longer than the lease: only renewal keeps the reservation
        refused = await post_chat(s, url, created["key"], body)
        assert (429, "budget_exceeded") == (refused.status, refused.json()["error"]["code"])
        for pid in workers_of(gw.proc.pid):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(aiohttp.ClientError):
            await slow
        deadline = time.monotonic() + 40
        while True:  # replacement workers; the dead reservation lapses after lease_seconds
            try:
                answer = await post_chat(s, url, created["key"], body)
            except aiohttp.ClientError:
                answer = None
            if answer is not None and answer.status == 200:
                break
            assert time.monotonic() < deadline, answer and (answer.status, answer.body)
            await asyncio.sleep(0.2)
    deadline = time.monotonic() + 30
    while True:  # the served request is committed and applied; the lapsed hold is gone
        c = await counter(redis_url, created["id"])
        spent = await ledger_spend(db_url, created["id"])
        if spent and (c["v"], c["r"]) == (str(spent), "0"):
            break
        assert time.monotonic() < deadline, (c, spent)
        await asyncio.sleep(0.1)


async def test_reconcile_resets_a_drifted_counter_to_the_ledger_and_keeps_holds(
    make_gateway: Any, mock_upstream: Any, pg_env: str, with_redis: str, tmp_path: Path
) -> None:
    """A counter that drifted (a cost applied twice, one lost): the next reconcile sets v to the
    ledger's sum while a request in flight keeps its reservation."""
    gw = await make_gateway(
        ledger_toml(mock_upstream.base_url, tmp_path, flush_ms=50, redis="budget_reconcile_seconds = 0.5")
    )
    user = await create_user(gw, "reconcile@example.com")
    created = await create_key(gw, user["id"], limits={"budget_usd": 10.0})
    user_id, key_id, key = user["id"], created["id"], created["key"]
    for _ in range(3):
        assert 200 == (await post_chat(gw, CHAT, key, chat_body())).status
    await settle(gw)
    r = aioredis.Redis.from_url(with_redis, decode_responses=True)
    try:
        (name,) = await r.keys(f"*:b:k:{key_id}:all")
        await r.hincrby(name, "v", 123_456)  # drift
        async with aiohttp.ClientSession() as s:
            slow = asyncio.ensure_future(
                post_chat(s, str(gw.make_url(CHAT)), key, chat_body(), {"x-mock-latency-ms": "4500"})
            )
            limiter = gw.server.app[keys.LIMITER]
            # All of this happens while the slow one is in flight (as long as the test upstream's
            # first_byte_timeout of 5 s allows).
            deadline = time.monotonic() + 4.4
            while (await mock_upstream.stats()).get("requests", 0) < 4:  # the slow one holds its reservation
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            spent = await ledger_spend(pg_env, key_id)
            # The periodic reconcile (the slow request touched the counter after the drift) repairs it.
            while (await r.hget(name, "v")) != str(spent):
                assert time.monotonic() < deadline, await r.hgetall(name)
                await asyncio.sleep(0.05)
            # A rebase while the request is in flight keeps its reservation.
            await r.hincrby(name, "v", 777)
            # (0 when a periodic rebase marked it meanwhile: that one finishes the job)
            assert await limiter.budgets.rebase({name: scope_of(name, user_id, key_id)}) in (0, 1)
            while (during := await r.hgetall(name))["v"] != str(spent):
                assert time.monotonic() < deadline, during
                await asyncio.sleep(0.02)
            held = {k: v for k, v in during.items() if k.startswith("h:")}
            assert 1 == len(held)
            assert int(during["r"]) == int(next(iter(held.values()))) > 0  # the slow one's worst case
            assert 200 == (await slow).status
        await settle(gw)
        final = await r.hgetall(name)
    finally:
        await r.aclose()
    spent = await ledger_spend(pg_env, key_id)
    assert (str(spent), "0", {}) == (final["v"], final["r"], holds(final))


@pytest.mark.parametrize(
    ("xid", "snapshot", "counted_by_snapshot"),
    [
        (99, "100:105:", True),  # committed before the snapshot's oldest running transaction
        (100, "100:105:100,103", False),  # running when the snapshot was taken
        (101, "100:105:100,103", True),  # finished before, between running ones
        (103, "100:105:100,103", False),
        (105, "100:105:", False),  # began after the snapshot
        (2**40 + 7, f"{2**40}:{2**40 + 9}:{2**40 + 8}", True),  # epoch-extended xid8 values
        (2**40 + 8, f"{2**40}:{2**40 + 9}:{2**40 + 8}", False),
    ],
)
async def test_apply_adds_only_commits_the_rebuild_snapshot_did_not_see(
    redis_url: str, xid: int, snapshot: str, counted_by_snapshot: bool
) -> None:
    """Postgres's visibility rule (xid < xmin, or < xmax and not in xip) in the Lua scripts, over real Redis."""
    from gateway.stores import redis_scripts as scripts

    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    key = "gw:v3:{u:vis}:b:k:vis:all"
    try:
        await r.delete(key)
        await r.eval(scripts.SEED.source, 1, key, "g1", snapshot, "", 1000, 0)  # type: ignore[misc]
        await r.eval(scripts.APPLY.source, 1, key, "req_1", 50, xid)  # type: ignore[misc]
        assert (1000 if counted_by_snapshot else 1050) == int(await r.hget(key, "v"))  # type: ignore[arg-type]
        # The same record queued while the counter was missing is folded in by SEED the same way.
        await r.delete(key)
        await r.eval(scripts.APPLY.source, 1, key, "req_1", 50, xid)  # type: ignore[misc]
        assert 0 < await r.ttl(key) <= 86_400  # a placeholder never outlives a day
        await r.eval(scripts.SEED.source, 1, key, "g2", snapshot, "", 1000, 0)  # type: ignore[misc]
        got = await r.hgetall(key)
        assert (1000 if counted_by_snapshot else 1050) == int(got["v"])
        assert not [k for k in got if k.startswith("q:")]
        assert -1 == await r.ttl(key)  # a total budget's counter does not expire
    finally:
        await r.aclose()


async def test_hundred_at_once_over_two_instances_never_overspend_and_the_rest_is_exact(
    make_gateway: Any, mock_upstream: Any, pg_env: str, with_redis: str, tmp_path: Path
) -> None:
    """Database mode, two gateways: a budget that fits 10 worst cases admits 10 of 100 concurrent requests;
    once their real costs are committed, exactly as many more worst cases fit as the ledger says are left."""
    body = chat_body(100)
    wc = worst_case(body, 100)
    budget = 10 * wc + 1
    gws = [await make_gateway(ledger_toml(mock_upstream.base_url, tmp_path / str(i), flush_ms=100)) for i in range(2)]
    key_id, key = await budget_key(gws[0], budget / 1e12)
    answers = await fire([(g, CHAT) for g in gws], 100, key, body, HOLD)
    assert {200: 10, 429: 90} == statuses(answers)
    for g in gws:
        await settle(g)
    spent = await ledger_spend(pg_env, key_id)
    assert 0 < spent <= budget
    c = await counter(with_redis, key_id)
    assert (str(spent), "0", {}) == (c["v"], c["r"], holds(c))
    fits = (budget - spent) // wc  # what the real costs left room for
    again = await fire([(g, CHAT) for g in gws], 30, key, body, HOLD)
    assert {200: fits, 429: 30 - fits} == statuses(again)
    for g in gws:
        await settle(g)
    assert await ledger_spend(pg_env, key_id) <= budget


@pytest.mark.parametrize("ending", ["unmark", "expiry"])
async def test_an_abandoned_rebase_counts_what_it_queued(redis_url: str, ending: str) -> None:
    """Costs applied while a rebase's mark is up are queued; if the rebase never finishes (no ledger
    answer: UNMARK; the rebasing process died: the mark expires) they are added as APPLY would have."""
    from gateway.stores import redis_scripts as scripts

    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    key = "gw:v3:{u:mark}:b:k:mark:all"
    try:
        await r.delete(key)
        await r.eval(scripts.SEED.source, 1, key, "g1", "100:105:", "", 1000, 0)  # type: ignore[misc]
        await r.eval(scripts.MARK.source, 1, key, "tok", 200 if ending == "expiry" else 60_000)  # type: ignore[misc]
        await r.eval(scripts.APPLY.source, 1, key, "req_a", 50, 200)  # type: ignore[misc]  # after the snapshot
        await r.eval(scripts.APPLY.source, 1, key, "req_b", 70, 99)  # type: ignore[misc]  # the snapshot saw it
        queued = await r.hgetall(key)
        assert ("1000", 2) == (queued["v"], len([k for k in queued if k.startswith("q:")]))
        if ending == "unmark":
            await r.eval(scripts.UNMARK.source, 1, key, "other")  # type: ignore[misc]  # not its mark: nothing
            assert "1000" == await r.hget(key, "v")
            await r.eval(scripts.UNMARK.source, 1, key, "tok")  # type: ignore[misc]
            expected = 1050
        else:
            await asyncio.sleep(0.3)
            await r.eval(scripts.APPLY.source, 1, key, "req_c", 5, 300)  # type: ignore[misc]
            expected = 1055
        got = await r.hgetall(key)
        assert str(expected) == got["v"]
        assert not [k for k in got if k.startswith("q:") or k == "x"]
    finally:
        await r.aclose()


async def test_a_rebase_without_a_ledger_answer_unmarks_at_once(redis_url: str) -> None:
    """Postgres does not answer during a rebase: RebuildFailed (the counter stays stale), no mark left."""
    from gateway.accounting.pricing import PriceTable
    from gateway.config import parse
    from gateway.policy.budget_rebuild import BudgetScope
    from gateway.policy.budgets import RebuildFailed
    from gateway.policy.limits import RedisLimiter
    from gateway.stores import redis_scripts as scripts
    from gateway.stores.redis import RedisStore

    async def down(scopes: Any) -> None:
        raise ConnectionRefusedError

    cfg = parse("")
    limiter = RedisLimiter(cfg, RedisStore(cfg.redis, redis_url), PriceTable.load(cfg), rebuild=down)
    await limiter.start()
    key = "gw:v3:{u:nl}:b:k:nl:all"
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await r.delete(key)
        await r.eval(scripts.SEED.source, 1, key, "g1", "100:105:", "", 1000, 0)  # type: ignore[misc]
        with pytest.raises(RebuildFailed):
            await limiter.budgets.rebase({key: (BudgetScope("nl", "nl", "total", 0.0), 0)})
        got = await r.hgetall(key)
        assert "x" not in got
        assert "1000" == got["v"]
    finally:
        await r.aclose()
        await limiter.close()
