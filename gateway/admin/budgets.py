"""GET /admin/budgets: spend against limit for keys or users that have a budget, current period.

``scope=key`` (default) or ``scope=user``; keyset paging (``limit``,
``cursor``) over the budgeted keys (not revoked) or users (not deleted),
oldest first.  Spend comes from the ``usage_daily`` rollup (a user's from
``usage_daily_users``), the ledger's committed truth, summed from the start of each budget's period (UTC day,
UTC month, or all time): one indexed query per page.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from gateway.admin import validation as v
from gateway.admin.common import connect
from gateway.auth.guard import require_admin
from gateway.auth.responses import json_response
from gateway.stores.limits_codec import limits_from_json

SCOPES = ("key", "user")
ALL_TIME = date(1, 1, 1)

_KEYS = (
    "SELECT k.id, k.name, k.prefix, k.user_id, u.email, k.limits, k.created_at "
    "FROM access_keys k JOIN users u ON u.id = k.user_id "
    "WHERE k.limits ? 'budget_usd' AND k.revoked_at IS NULL{after} "
    "ORDER BY k.created_at, k.id LIMIT $1"
)
_USERS = (
    "SELECT u.id, u.name, u.email, u.limits, u.created_at FROM users u "
    "WHERE u.limits ? 'budget_usd' AND u.deleted_at IS NULL{after} "
    "ORDER BY u.created_at, u.id LIMIT $1"
)
_AFTER = {"key": " AND (k.created_at, k.id) > ($2, $3)", "user": " AND (u.created_at, u.id) > ($2, $3)"}
_SPEND = (
    "SELECT x.id, coalesce(sum(d.cost_micros), 0)::bigint AS spent "
    "FROM unnest($1::text[], $2::date[]) AS x(id, since) "
    "LEFT JOIN {rollup} d ON d.{col} = x.id AND d.day >= x.since GROUP BY x.id"
)


def period_start(period: str, today: date) -> date:
    """The first UTC day that counts towards a budget of ``period`` on ``today``."""
    if period == "day":
        return today
    if period == "month":
        return today.replace(day=1)
    return ALL_TIME


class _Row:
    __slots__ = ("created_at", "id")

    def __init__(self, r: Any) -> None:
        self.id = str(r["id"])
        self.created_at = r["created_at"]


async def list_budgets(request: web.Request) -> web.Response:
    await require_admin(request)
    limit, after = v.page(request)
    scope = v.query_choice(request, "scope", SCOPES) or "key"
    args: list[Any] = [limit]
    if after is not None:
        args += [after[0], after[1]]
    sql = (_KEYS if scope == "key" else _USERS).format(after=_AFTER[scope] if after else "")
    today = datetime.now(UTC).date()
    async with connect(request) as conn:
        rows = await conn.fetch(sql, *args)
        limits = [limits_from_json(r["limits"]) for r in rows]
        starts = [period_start(lim.budget_period, today) for lim in limits]
        ids = [str(r["id"]) for r in rows]
        col, rollup = ("key_id", "usage_daily") if scope == "key" else ("user_id", "usage_daily_users")
        sql = _SPEND.format(col=col, rollup=rollup)
        spent = {r["id"]: r["spent"] for r in await conn.fetch(sql, ids, starts)} if ids else {}
    data = []
    for r, lim, since in zip(rows, limits, starts, strict=True):
        rid = str(r["id"])
        budget_micros = round((lim.budget_usd or 0.0) * 1_000_000)
        used = int(spent.get(rid, 0))
        item: dict[str, Any] = {
            "scope": scope, "id": rid, "name": r["name"], "email": r["email"],
            "budget_usd": lim.budget_usd, "budget_period": lim.budget_period,
            "period_start": None if since == ALL_TIME else since.isoformat(),
            "spent_micros": used, "spent_usd": used / 1_000_000,
            "used_ratio": used / budget_micros if budget_micros else (1.0 if used else 0.0),
        }
        if scope == "key":
            item["prefix"] = r["prefix"]
            item["user_id"] = str(r["user_id"])
        data.append(item)
    return json_response({"data": data, "next_cursor": v.next_cursor([_Row(r) for r in rows], limit)})
