"""How many keys and users are near or at their budget: the ``gateway_budgets`` gauge for alerts.

Every ``PERIOD_S`` each worker (database mode) counts, from the ``usage_daily``
rollup, the budgeted keys (not revoked) and users (not deleted) whose spend in
their current period (UTC day, UTC month, or all time) reached ``NEAR`` of
the budget, and those at or over it.  One bounded query off the request path;
the gauge is the max over live workers, so N workers report one figure.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from gateway import keys, tasks
from gateway.stores.postgres import DatabaseUnavailable

PERIOD_S = 60.0
NEAR = 0.8
QUERY_TIMEOUT_S = 10.0
log = structlog.get_logger("budget_watch")

_SINCE = (
    "CASE {t}.limits->>'budget_period' WHEN 'day' THEN (now() AT TIME ZONE 'UTC')::date "
    "WHEN 'month' THEN date_trunc('month', now() AT TIME ZONE 'UTC')::date ELSE date '0001-01-01' END"
)
_SCOPE = """
SELECT '{scope}' AS scope,
       count(*) FILTER (WHERE s.spent >= $1 * b.cap AND s.spent < b.cap) AS near,
       count(*) FILTER (WHERE s.spent >= b.cap) AS exhausted
FROM (SELECT t.id::text AS id, (t.limits->>'budget_usd')::float8 * 1e6 AS cap, {since} AS since
      FROM {table} t WHERE t.limits ? 'budget_usd' AND {live}) b
CROSS JOIN LATERAL (SELECT coalesce(sum(d.cost_micros), 0) AS spent FROM {rollup} d
                    WHERE d.{column} = b.id AND d.day >= b.since) s
"""
# Each half walks its own partial index (migration 0040) and a rollup's (column, day) index
# (a user's spend from the smaller per-user rollup of migration 0041).
_COUNT = (
    _SCOPE.format(scope="key", table="access_keys", live="t.revoked_at IS NULL", column="key_id",
                  rollup="usage_daily", since=_SINCE.format(t="t"))
    + " UNION ALL "
    + _SCOPE.format(scope="user", table="users", live="t.deleted_at IS NULL", column="user_id",
                    rollup="usage_daily_users", since=_SINCE.format(t="t"))
)


async def count_budgets(conn: object) -> dict[tuple[str, str], int]:
    """(scope, state) -> how many keys or users are in it now."""
    out = {(scope, state): 0 for scope in ("key", "user") for state in ("near", "exhausted")}
    rows = await conn.fetch(_COUNT, NEAR, timeout=QUERY_TIMEOUT_S)  # type: ignore[attr-defined]
    for r in rows:
        out[(r["scope"], "near")] = int(r["near"])
        out[(r["scope"], "exhausted")] = int(r["exhausted"])
    return out


async def budget_watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: refresh the budget gauge every PERIOD_S (database mode only)."""
    db = app.get(keys.PG)
    metrics = app[keys.METRICS]
    if db is None:
        yield
        return

    async def loop() -> None:
        await asyncio.sleep(random.uniform(0.0, 1.0))  # workers started together need not query together
        while True:
            try:
                async with db.connection(timeout=5.0) as conn:
                    counts = await count_budgets(conn)
                for (scope, state), n in counts.items():
                    metrics.budgets.labels(scope, state).set(n)
            except (DatabaseUnavailable, OSError, TimeoutError) as exc:
                log.info("budget watch skipped", error=type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - a gauge must never take the worker down
                log.warning("budget watch failed", error=type(exc).__name__)
            await asyncio.sleep(PERIOD_S)

    task = asyncio.get_running_loop().create_task(loop())
    yield
    await tasks.stop(task)
