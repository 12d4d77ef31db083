"""A revocation is never missed because the LISTEN connection was not there to hear it.

The key cache is only as good as its invalidation channel: while a worker's
LISTEN connection is down (still coming up at start, or lost and not yet
back), a cached key must not outlive a revocation made in that window.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from gateway import keys
from gateway.stores import access_keys
from gateway.stores.notify import APPLICATION_NAME
from gateway.stores.postgres import _init_connection
from tests.fixtures.control_plane import ADMIN, call_model, create_key, create_user


async def _until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_revocation_made_while_the_listener_is_away_is_seen_at_the_next_request(cp):
    """LISTEN connection killed and kept from coming back; the key is revoked (its NOTIFY reaches nobody):
    the next request with the cached key is 401, not served from the cache."""
    user = await create_user(cp, "rev@example.com")
    key = await create_key(cp, user["id"])
    resolver = cp.server.app[keys.RESOLVER]
    await asyncio.wait_for(resolver.listener.connected.wait(), 30)
    assert 200 == await call_model(cp, key["key"])
    assert 200 == await call_model(cp, key["key"])  # now answered from the cache
    hits = resolver.stats.hits
    assert hits >= 1
    # Idle pooled connections for the re-check below (new connections will be refused): a few at once.
    assert {200} == {r.status for r in await asyncio.gather(*(cp.get("/admin/users", headers=ADMIN) for _ in range(6)))}

    dsn = cp.server.app[keys.PG].dsn
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    db = await conn.fetchval("SELECT current_database()")
    other = await asyncpg.connect(dsn, database="postgres")  # a database cannot close its own door
    try:
        # New connections to this database are refused (the gateway's pooled ones stay): the listener cannot return.
        await other.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()", APPLICATION_NAME)
        assert 1 == killed
        await _until(lambda: not resolver.listener.connected.is_set(), "the worker never noticed its listener died")
        assert await access_keys.revoke(conn, key["id"]) is not None
        assert 401 == await call_model(cp, key["key"])
    finally:
        await other.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await other.close()
        await conn.close()
    # The listener comes back by itself and the cache is trusted again.
    await _until(lambda: resolver.listener.connections >= 2, "the listener did not reconnect")
    assert 401 == await call_model(cp, key["key"])


async def test_a_cached_key_is_rechecked_until_the_listener_is_up(cp):
    """Before LISTEN is established no entry counts as fresh: each request asks Postgres
    (so a revocation made while the listener is still coming up cannot be missed)."""
    user = await create_user(cp, "early@example.com")
    key = await create_key(cp, user["id"])
    resolver = cp.server.app[keys.RESOLVER]
    await asyncio.wait_for(resolver.listener.connected.wait(), 30)
    await resolver.listener.close()  # as if it had not come up yet
    assert not resolver.listener.connected.is_set()
    lookups = resolver.stats.lookups
    for _ in range(3):
        assert 200 == await call_model(cp, key["key"])
    assert lookups + 3 == resolver.stats.lookups
    conn = await asyncpg.connect(cp.server.app[keys.PG].dsn)
    await _init_connection(conn)
    try:
        await access_keys.revoke(conn, key["id"])
    finally:
        await conn.close()
    assert 401 == await call_model(cp, key["key"])


async def test_a_database_refusing_new_connections_is_unavailable_not_an_error(cp):
    """A server that refuses a new connection with an SQL state (here: not accepting connections)
    is an outage: 529/503 and the admin API's 503, never a 500."""
    dsn = cp.server.app[keys.PG].dsn
    conn = await asyncpg.connect(dsn)
    db = await conn.fetchval("SELECT current_database()")
    other = await asyncpg.connect(dsn, database="postgres")
    try:
        await other.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        # Every pooled connection of the gateway gone: the next call must open one.
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert 529 == await call_model(cp, "gwk_" + "r" * 43)  # an unknown key cannot be checked
        r = await cp.get("/admin/users", headers=ADMIN)
        assert 503 == r.status
        assert "unavailable" == (await r.json())["error"]["code"]
    finally:
        await other.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await other.close()
        await conn.close()
