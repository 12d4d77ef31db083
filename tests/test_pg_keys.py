"""Postgres-backed keys on the hot path: cache, instant revocation, outages, floods."""

from __future__ import annotations

import asyncio
import secrets
import time

import asyncpg

from gateway import keys
from tests.fixtures.control_plane import (
    ADMIN,
    call_model,
    create_key,
    create_user,
    pg_toml,
)


async def _wait_status(client, key: str, status: int, within: float = 20.0) -> float:
    """Poll until the key gets ``status``; the seconds it took (asserts it came within ``within``).

    NOTIFY is asynchronous: the deadline is generous for a loaded machine, and well under the
    key cache's TTL (60 s), so only the LISTEN/NOTIFY path can make it."""
    start = time.monotonic()
    while True:
        got = await call_model(client, key)
        elapsed = time.monotonic() - start
        if got == status:
            return elapsed
        assert elapsed < within, f"still {got} after {elapsed:.2f}s"
        await asyncio.sleep(0.02)


async def test_key_create_use_revoke_is_401_on_this_and_a_second_gateway_by_notify(
        cp, make_gateway, mock_upstream):
    """A revoked key stops working on every gateway instance, by LISTEN/NOTIFY (well before the cache TTL)."""
    other = await make_gateway(pg_toml(mock_upstream.base_url))
    user = await create_user(cp, "kim@example.com")
    key = await create_key(cp, user["id"], name="ci")
    assert key["key"].startswith("gwk_") and len(key["key"]) >= 36
    assert key["key"].startswith(key["prefix"])
    assert 200 == await call_model(cp, key["key"])
    assert 200 == await call_model(other, key["key"])  # cached in both now
    r = await cp.delete(f"/admin/keys/{key['id']}", headers=ADMIN)
    assert 204 == r.status
    assert 401 == await call_model(cp, key["key"])
    await _wait_status(other, key["key"], 401)


async def test_limit_changes_reach_cached_keys_at_once(cp, make_gateway, mock_upstream):
    """PATCHing a key's models is seen by a second gateway that had the key cached."""
    other = await make_gateway(pg_toml(mock_upstream.base_url))
    user = await create_user(cp, "lee@example.com")
    key = await create_key(cp, user["id"])
    assert 200 == await call_model(other, key["key"])
    r = await cp.patch(f"/admin/keys/{key['id']}", headers=ADMIN, json={"limits": {"models": ["demo-other-*"]}})
    assert 200 == r.status
    await _wait_status(other, key["key"], 403)
    r = await cp.patch(f"/admin/users/{user['id']}", headers=ADMIN, json={"disabled": True})
    assert 200 == r.status


async def test_disabled_user_and_expired_key_are_refused(cp):
    """A disabled user's key gets 403; a key past its expiry gets 401."""
    user = await create_user(cp, "max@example.com")
    key = await create_key(cp, user["id"])
    assert 200 == await call_model(cp, key["key"])
    await cp.patch(f"/admin/users/{user['id']}", headers=ADMIN, json={"disabled": True})
    assert 403 == await call_model(cp, key["key"])
    user2 = await create_user(cp, "ned@example.com")
    key2 = await create_key(cp, user2["id"])
    conn = await asyncpg.connect(cp.server.app[keys.PG].dsn)
    try:
        await conn.execute("UPDATE access_keys SET expires_at = now() - interval '1 second' WHERE id = $1",
                           key2["id"])
    finally:
        await conn.close()
    await _wait_status(cp, key2["key"], 401)


async def test_postgres_down_cached_key_served_unknown_key_503_and_recovery_without_restart(
        cp, pg_server, make_gateway, mock_upstream):
    """Postgres stopped: a cached key still works, an unknown key gets 503 (not 401); back: all normal,
    including revocation by NOTIFY on another instance (its listener reconnected by itself)."""
    other = await make_gateway(pg_toml(mock_upstream.base_url))
    user = await create_user(cp, "oli@example.com")
    key = await create_key(cp, user["id"])
    fresh = await create_key(cp, user["id"])  # never used: not cached
    assert 200 == await call_model(cp, key["key"])
    # The throwaway cluster runs with synchronous_commit=off: make the rows durable before the crash-stop.
    conn = await asyncpg.connect(cp.server.app[keys.PG].dsn)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    pg_server.stop()
    try:
        assert 200 == await call_model(cp, key["key"])
        assert 529 == await call_model(cp, fresh["key"])  # Anthropic path: 529 overloaded (503 on OpenAI)
        r = await cp.post("/v1/chat/completions", headers={"authorization": "Bearer gwk_" + "z" * 43},
                          json={"model": "demo-gpt", "messages": []})
        assert 503 == r.status
        r = await cp.get("/admin/users", headers=ADMIN)
        assert 503 == r.status
        assert "unavailable" == (await r.json())["error"]["code"]
    finally:
        pg_server.start()
    deadline = time.monotonic() + 15
    while (got := await call_model(cp, fresh["key"])) != 200:
        assert time.monotonic() < deadline, f"no recovery after Postgres came back: {got}"
        await asyncio.sleep(0.2)
    assert 401 == await call_model(cp, "gwk_" + "y" * 43)
    assert 200 == await call_model(cp, key["key"])
    resolver = other.server.app[keys.RESOLVER]
    deadline = time.monotonic() + 15
    while resolver.listener.connections < 2:  # connected, lost, connected again
        assert time.monotonic() < deadline, "listener did not reconnect"
        await asyncio.sleep(0.1)
    assert 200 == await call_model(other, key["key"])
    assert 204 == (await cp.delete(f"/admin/keys/{key['id']}", headers=ADMIN)).status
    await _wait_status(other, key["key"], 401)


async def test_negative_cache_is_bounded_and_postgres_sees_a_bounded_number_of_lookups(
        make_gateway, mock_upstream, pg_env):
    """A flood of random keys: the negative cache stays at its size; lookups stay within the budget."""
    client = await make_gateway(pg_toml(mock_upstream.base_url, extra="""
        [database]
        negative_cache_size = 50
        key_lookup_rate = 100
        """))
    resolver = client.server.app[keys.RESOLVER]
    await asyncio.wait_for(resolver.listener.connected.wait(), 30)  # its (re)connect drops in-flight results
    repeat = "gwk_" + secrets.token_urlsafe(32)
    for _ in range(20):
        assert 401 == await call_model(client, repeat)
    assert 1 == resolver.stats.lookups  # then answered from the negative cache
    start = time.monotonic()
    statuses = await asyncio.gather(*(call_model(client, "gwk_" + secrets.token_urlsafe(32)) for _ in range(400)))
    elapsed = time.monotonic() - start
    assert {401, 529} >= set(statuses)  # over budget: 529 "retry", never a 401 for a key it did not check
    assert resolver.sizes()[1] <= 50
    assert resolver.stats.lookups <= 1 + 100 + 100 * elapsed


async def test_last_used_is_written_in_batches(make_gateway, mock_upstream, pg_env):
    """Using a key sets last_used_at after the next batch flush, not per request."""
    client = await make_gateway(pg_toml(mock_upstream.base_url, extra="""
        [database]
        last_used_flush_seconds = 0.2
        """))
    user = await create_user(client, "pat@example.com")
    key = await create_key(client, user["id"])
    assert None is key["last_used_at"]
    for _ in range(5):
        assert 200 == await call_model(client, key["key"])
    deadline = time.monotonic() + 30
    while True:
        got = await (await client.get(f"/admin/keys/{key['id']}", headers=ADMIN)).json()
        if got["last_used_at"] is not None:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_config_file_keys_keep_working_in_database_mode(cp):
    """Keys from the TOML file are still accepted when a database is configured."""
    from tests.conftest import TEST_KEY

    assert 200 == await call_model(cp, TEST_KEY)


async def test_gateway_starts_with_postgres_down_and_recovers_by_itself(make_gateway, mock_upstream, pg_env,
                                                                        pg_server):
    """Postgres down at start: the gateway starts (503 for keys and admin), then works once Postgres is up."""
    conn = await asyncpg.connect(pg_env)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    pg_server.stop()
    try:
        client = await make_gateway(pg_toml(mock_upstream.base_url))
        assert 529 == await call_model(client, "gwk_" + secrets.token_urlsafe(32))
        assert 503 == (await client.get("/admin/users", headers=ADMIN)).status
    finally:
        pg_server.start()
    deadline = time.monotonic() + 15
    while (await client.get("/admin/users", headers=ADMIN)).status != 200:
        assert time.monotonic() < deadline, "no recovery after Postgres came back"
        await asyncio.sleep(0.2)
    user = await create_user(client, "late@example.com")
    key = await create_key(client, user["id"])
    assert 200 == await call_model(client, key["key"])


async def test_a_cached_key_past_its_ttl_is_still_served_while_postgres_is_down(make_gateway, mock_upstream,
                                                                                pg_env, pg_server):
    """Stale-if-error: an expired cache entry keeps working while Postgres cannot revalidate it."""
    client = await make_gateway(pg_toml(mock_upstream.base_url, extra="""
        [database]
        key_cache_seconds = 0.2
        """))
    user = await create_user(client, "ttl@example.com")
    key = await create_key(client, user["id"])
    assert 200 == await call_model(client, key["key"])
    conn = await asyncpg.connect(pg_env)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    pg_server.stop()
    try:
        await asyncio.sleep(0.4)
        for _ in range(3):
            assert 200 == await call_model(client, key["key"])
    finally:
        pg_server.start()
