"""A flood of random keys from one client cannot keep real keys out.

Lookups of keys the worker has not cached are budgeted; the budget is not a
commons: keys in the filter of live keys (every key in Postgres, announced
by a trigger the moment it is created) are looked up at once, others need a
token from their client's budget.  The test floods random keys from one
client, with budgets small enough that the flood exhausts them many times
over, while fresh keys are created in Postgres (by SQL, as another gateway or
the CLI would, and through the admin API): every fresh key gets 200 on its
first use; the flood gets only 401 (or 503 while it cannot be told apart).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg

from gateway.policy.principals import display_prefix, hash_key
from tests.fixtures.control_plane import call_model, create_key, create_user, pg_toml

BUDGETS = """
[auth]
key_lookup_rate_per_ip = 2.0
new_key_wait_seconds = 1.0

[database]
key_lookup_rate = 5.0
"""


async def _flood(gw: Any, stop: asyncio.Event, statuses: list[int]) -> None:
    while not stop.is_set():
        statuses.append(await call_model(gw, "gwk_" + secrets.token_urlsafe(32)))


async def test_random_key_flood_does_not_block_fresh_real_keys(make_gateway, mock_upstream, pg_env):
    """12 fresh keys (SQL and admin API) each answer 200 on first use during a random-key flood."""
    gw = await make_gateway(pg_toml(mock_upstream.base_url, extra=BUDGETS))
    user = await create_user(gw, "tenant@example.com")
    stop = asyncio.Event()
    flood_statuses: list[int] = []
    flooders = [asyncio.ensure_future(_flood(gw, stop, flood_statuses)) for _ in range(40)]
    conn = await asyncpg.connect(pg_env)
    first_use: list[int] = []
    try:
        while len(flood_statuses) < 100:  # the budgets are exhausted many times over before the first key
            await asyncio.sleep(0.01)
        for i in range(12):
            if i % 2:
                key = (await create_key(gw, user["id"], name=f"api-{i}"))["key"]
            else:
                key = "gwk_" + secrets.token_urlsafe(32)
                await conn.execute(
                    "INSERT INTO access_keys (user_id, name, key_hash, prefix) VALUES ($1, $2, $3, $4)",
                    user["id"], f"sql-{i}", hash_key(key), display_prefix(key),
                )
            first_use.append(await call_model(gw, key))
    finally:
        stop.set()
        await asyncio.gather(*flooders)
        await conn.close()
    assert [200] * 12 == first_use
    assert set(flood_statuses) <= {401, 529}
    assert flood_statuses.count(401) > len(flood_statuses) // 2


async def test_over_budget_unknown_keys_never_reach_postgres(make_gateway, mock_upstream, pg_env):
    """With the filter current, random keys past the budget are refused (401) without a query."""
    gw = await make_gateway(pg_toml(mock_upstream.base_url, extra=BUDGETS.replace("new_key_wait_seconds = 1.0",
                                                                                  "new_key_wait_seconds = 0")))
    await create_user(gw, "someone@example.com")
    statuses = await asyncio.gather(*(call_model(gw, "gwk_" + secrets.token_urlsafe(32)) for _ in range(100)))
    assert [401] * 100 == statuses
    events = await key_cache_events(gw)
    assert events.get("lookups", 0) <= 10  # the budgets' bursts (2 per IP, 5 per worker), no more
    assert events["refused_unknown"] >= 90


async def key_cache_events(gw: Any) -> dict[str, float]:
    text = await (await gw.get("/metrics")).text()
    out = {}
    for line in text.splitlines():
        if line.startswith("gateway_key_cache_events_total{"):
            name = line.split('event="', 1)[1].split('"', 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def test_gate_known_keys_pass_and_clients_have_their_own_budgets():
    """Pure logic: a live key's hash always passes; one client's exhaustion leaves another's budget alone."""
    from gateway.policy.lookup_gate import LookupGate

    gate = LookupGate(rate=1000.0, rate_per_ip=3.0, wait_s=0.0)
    live = hash_key("gwk_live")
    gate.loaded({live[:16]})
    assert [True] * 50 == [gate.take(live, "10.0.0.1") for _ in range(50)]
    flood = [gate.take(hash_key(f"gwk_{i}"), "10.0.0.1") for i in range(50)]
    assert 3 == sum(flood)
    assert gate.take(hash_key("gwk_other"), "10.0.0.2")


async def test_gate_waits_for_an_announcement():
    """An over-budget key that is announced while it waits passes; a never-announced one does not."""
    from gateway.policy.lookup_gate import LookupGate

    gate = LookupGate(rate=1.0, rate_per_ip=1.0, wait_s=5.0)
    gate.loaded(set())
    h = hash_key("gwk_fresh")
    waiting = asyncio.ensure_future(gate.wait_announced(h))
    await asyncio.sleep(0)
    gate.announce(h[:16])
    assert await waiting
    quick = LookupGate(rate=1.0, rate_per_ip=1.0, wait_s=0.05)
    quick.loaded(set())
    assert not await quick.wait_announced(hash_key("gwk_never"))
