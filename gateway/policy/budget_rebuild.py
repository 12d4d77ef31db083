"""Rebuild budget counters from the usage ledger (Postgres is the truth for spend).

Redis only caches spend.  When a budget counter is missing (Redis restarted
empty, was flushed, evicted the key, or a new period began) the limiter asks
``rebuild_budgets`` for what each scope has spent since its period began,
writes that into Redis, and only then enforces the budget again: a restart
never hands anyone a fresh budget.

Until the accounting issue lands the ledger, this is a no-op hook that
answers ``None`` ("no ledger"); the limiter then seeds each counter with the
largest spend it has itself seen for that scope (nothing is forgotten that
this worker knew).  The accounting engineer completes it: one query summing
``cost_micros`` per scope, bounded by a short timeout (the limiter also
bounds the call and falls back to local limits when it fails).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from aiohttp import web


@dataclass(frozen=True, slots=True)
class BudgetScope:
    """One budget counter: a key's (``key_id``) or a user's over all its keys (``key_id`` None)."""

    user_id: str
    key_id: str | None
    period: Literal["day", "month", "total"]
    since: float  # unix seconds: the start of the period (UTC); 0.0 for "total"


async def rebuild_budgets(app: web.Application, scopes: Sequence[BudgetScope]) -> dict[BudgetScope, int] | None:
    """Micro-dollars each scope has spent since ``scope.since``, from the ledger.

    Return ``None`` when there is no ledger to ask (standalone, or not yet
    built); raise when the ledger cannot be read (the limiter then degrades
    instead of enforcing a budget it cannot know).  A scope missing from the
    answer counts as zero spend.
    """
    return None
