"""Spend against budgets, from the ledger's daily rollup, turned into alert events (exactly once).

One evaluation (every ``[alerts] evaluate_seconds``, off the hot path) runs
in a transaction holding a transaction-scoped advisory lock, so concurrent
gateways take turns instead of repeating the work; even without it an event
is an INSERT on the unique (rule, period_start, threshold), so no threshold
fires twice in a period whoever evaluates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

LOCK_KEY = "gateway_alerts_evaluate"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_RULES = """
SELECT a.id, a.scope, a.target_id, a.name, a.budget_micros, a.period, a.thresholds, a.webhook_url,
       CASE a.scope WHEN 'key' THEN k.limits WHEN 'user' THEN u.limits ELSE t.limits END AS target_limits
FROM alert_rules a
LEFT JOIN access_keys k ON a.scope = 'key' AND k.id = a.target_id
LEFT JOIN users u ON a.scope = 'user' AND u.id = a.target_id
LEFT JOIN teams t ON a.scope = 'team' AND t.id = a.target_id
WHERE a.enabled
"""

# Spend since a day (inclusive) from the daily rollup, which the ledger writer
# maintains in the same transaction as the ledger rows.
_SPEND = {
    "key": "SELECT coalesce(sum(cost_micros), 0) FROM usage_daily WHERE key_id = $1 AND day >= $2",
    "user": "SELECT coalesce(sum(cost_micros), 0) FROM usage_daily WHERE user_id = $1 AND day >= $2",
    "team": "SELECT coalesce(sum(cost_micros), 0) FROM usage_daily WHERE day >= $2 "
            "AND user_id = ANY(SELECT id::text FROM users WHERE team_id = $1::uuid)",
}

_FIRE = """
INSERT INTO alert_events (rule_id, period_start, threshold, spend_micros, budget_micros, payload, webhook_url)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (rule_id, period_start, threshold) DO NOTHING
RETURNING id
"""


def period_start(period: str, now: datetime) -> datetime:
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return EPOCH


def crossed(spend: int, budget: int, thresholds: tuple[int, ...] | list[int]) -> list[int]:
    """Thresholds (percent) reached by spend, exactly: spend * 100 >= t * budget (integers)."""
    return sorted(t for t in set(thresholds) if spend * 100 >= t * budget)


@dataclass(frozen=True, slots=True)
class Target:
    budget_micros: int
    period: str


def target_budget(rule: Any) -> Target | None:
    """The rule's own budget, else its target's configured budget (None: nothing to measure)."""
    limits = rule["target_limits"] or {}
    period = rule["period"] or limits.get("budget_period") or "total"
    budget = rule["budget_micros"]
    if budget is None and limits.get("budget_usd") is not None:
        budget = round(float(limits["budget_usd"]) * 1_000_000)
    if not budget or budget <= 0:
        return None
    return Target(int(budget), period)


async def evaluate_once(conn: asyncpg.Connection, now: datetime | None = None) -> int | None:
    """Fire every threshold newly reached; the number fired, or None when another gateway holds the turn.

    Call inside a transaction (the advisory lock lasts until it ends)."""
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", LOCK_KEY):
        return None
    now = now or datetime.now(UTC)
    fired = 0
    for rule in await conn.fetch(_RULES):
        target = target_budget(rule)
        if target is None:
            continue
        start = period_start(target.period, now)
        spend = int(await conn.fetchval(_SPEND[rule["scope"]], str(rule["target_id"]), start.date()))
        for threshold in crossed(spend, target.budget_micros, rule["thresholds"]):
            payload = {
                "type": "budget.threshold_reached",
                "rule_id": str(rule["id"]), "rule_name": rule["name"],
                "scope": rule["scope"], "target_id": str(rule["target_id"]),
                "threshold": threshold, "period": target.period, "period_start": start.isoformat(),
                "budget_usd": target.budget_micros / 1_000_000, "spend_usd": spend / 1_000_000,
                "percent": round(spend * 100 / target.budget_micros, 2),
                "fired_at": now.isoformat(),
            }
            got = await conn.fetchval(_FIRE, rule["id"], start, threshold, spend, target.budget_micros, payload,
                                      rule["webhook_url"])
            if got is not None:
                fired += 1
    return fired
