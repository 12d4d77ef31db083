"""Rebuild budget counters from the usage ledger (Postgres is the truth for spend).

Redis only caches spend.  When a budget counter is missing (Redis restarted
empty, was flushed, evicted the key, or a new period began) the limiter asks
``rebuild_budgets`` for what each scope has spent since its period began,
writes that into Redis, and only then enforces the budget again: a restart
never hands anyone a fresh budget.

Standalone (no database) it answers ``None`` ("no ledger"); the limiter then
seeds each counter with the largest spend it has itself seen for that scope.
In database mode it is one query for all scopes: whole UTC days from the
``usage_daily`` rollup, plus the ledger rows of a partial first day when a
period does not start at midnight.  The answer carries the Postgres snapshot
the sums were read in: records committed later (still in a worker's journal
at the time) are applied to the rebuilt counter by the ledger writer, and the
snapshot tells the counter which commits it already holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from aiohttp import web

from gateway import keys

_SPENT_SQL = """
SELECT s.i,
       coalesce((SELECT sum(d.cost_pico) FROM usage_daily d
                 WHERE d.user_id = s.user_id AND (s.key_id IS NULL OR d.key_id = s.key_id)
                   AND d.day >= s.first_day), 0)
     + coalesce((SELECT sum(l.cost_pico) FROM usage_ledger l
                 WHERE l.user_id = s.user_id AND (s.key_id IS NULL OR l.key_id = s.key_id)
                   AND l.ts >= s.since AND l.ts < (s.first_day::timestamp AT TIME ZONE 'UTC')), 0) AS spent
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::date[])
     WITH ORDINALITY AS s(user_id, key_id, since, first_day, i)
"""


@dataclass(frozen=True, slots=True)
class BudgetScope:
    """One budget counter: a key's (``key_id``) or a user's over all its keys (``key_id`` None)."""

    user_id: str
    key_id: str | None
    period: Literal["day", "month", "total"]
    since: float  # unix seconds: the start of the period (UTC); 0.0 for "total"
    team_id: str | None = None  # a team's counter: the spend of all its current members
    model: str | None = None  # a team's per-model budget: only models matching this name or glob


@dataclass(frozen=True, slots=True)
class LedgerSpend:
    """What the ledger says each scope spent, and the snapshot (``xmin:xmax:xip,...``) it said it in."""

    spent: dict[BudgetScope, int]
    snapshot: str


async def rebuild_budgets(app: web.Application, scopes: Sequence[BudgetScope]) -> LedgerSpend | None:
    """Pico-dollars each scope has spent since ``scope.since``, from the ledger (exact: numeric sums).

    Return ``None`` when there is no ledger to ask (standalone, or not yet
    built); raise when the ledger cannot be read (the limiter then degrades
    instead of enforcing a budget it cannot know).  A scope missing from the
    answer counts as zero spend.
    """
    db = app.get(keys.PG)
    if db is None:
        return None
    since = [datetime.fromtimestamp(max(sc.since, 0.0), UTC) for sc in scopes]
    first_day = [_first_whole_day(t) for t in since]
    async with db.connection(timeout=2.0) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        # One snapshot for both statements: the sums are exactly the commits it sees.
        snapshot = await conn.fetchval("SELECT pg_current_snapshot()::text", timeout=2.0)
        rows = await conn.fetch(
            _SPENT_SQL, [sc.user_id for sc in scopes], [sc.key_id for sc in scopes], since, first_day, timeout=2.0
        ) if scopes else []
        spent = {scopes[r["i"] - 1]: int(r["spent"]) for r in rows}
        spent.update(await team_spend(conn, scopes, since, first_day))
    return LedgerSpend(spent, snapshot)


def _first_whole_day(t: datetime) -> date:
    d = t.date()
    return d if t == datetime(d.year, d.month, d.day, tzinfo=UTC) else d + timedelta(days=1)


# Team scopes: the spend of every current member of the team (same day/slice split).
_TEAM_SPENT_SQL = """
SELECT s.i,
       coalesce((SELECT sum(d.cost_pico) FROM usage_daily d
                 WHERE d.user_id IN (SELECT id::text FROM users WHERE team_id = s.team_id::uuid)
                   AND (s.pattern IS NULL OR d.model LIKE s.pattern ESCAPE '\\')
                   AND d.day >= s.first_day), 0)
     + coalesce((SELECT sum(l.cost_pico) FROM usage_ledger l
                 WHERE l.user_id IN (SELECT id::text FROM users WHERE team_id = s.team_id::uuid)
                   AND (s.pattern IS NULL OR l.model LIKE s.pattern ESCAPE '\\')
                   AND l.ts >= s.since AND l.ts < (s.first_day::timestamp AT TIME ZONE 'UTC')), 0) AS spent
FROM unnest($1::text[], $2::timestamptz[], $3::date[], $4::text[])
     WITH ORDINALITY AS s(team_id, since, first_day, pattern, i)
"""


def glob_to_like(pattern: str) -> str:
    """A model glob (``*`` and ``?`` only, as team model budgets allow) as a LIKE pattern."""
    out = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return out.replace("*", "%").replace("?", "_")


async def team_spend(conn: Any, scopes: Sequence[BudgetScope], since: list[datetime],
                     first_day: list[date]) -> dict[BudgetScope, int]:
    """Team scopes' spend in the caller's snapshot (the other scopes' rows for them are replaced)."""
    idx = [i for i, sc in enumerate(scopes) if sc.team_id is not None]
    if not idx:
        return {}
    rows = await conn.fetch(_TEAM_SPENT_SQL, [scopes[i].team_id for i in idx], [since[i] for i in idx],
                            [first_day[i] for i in idx],
                            [glob_to_like(m) if (m := scopes[i].model) is not None else None for i in idx],
                            timeout=2.0)
    return {scopes[idx[r["i"] - 1]]: int(r["spent"]) for r in rows}
