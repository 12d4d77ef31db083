"""GET /admin/usage and /me/usage: requests, tokens and cost, filtered and grouped.

Query parameters (all optional):

- ``from``, ``to``: ISO 8601 date or date-time (UTC when no offset is given);
  ``from`` inclusive, ``to`` exclusive.  Default: everything.
- ``user_id``, ``key_id``, ``model``: exact filters (``/me/usage`` is always
  the caller's own user; ``key_id`` there can only narrow it further).
- ``group_by``: ``day``, ``model``, ``key``, ``user``, or several joined with
  commas (``day,model``).  Default ``day``.

Fast on tens of millions of rows: whole UTC days come from the ``usage_daily``
rollup; only the partial days at the edges of a range are summed from the
ledger itself (one or two days, by index on ``ts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from aiohttp import web

from gateway.admin.common import connect
from gateway.auth.guard import require_admin, require_user
from gateway.auth.responses import bad_request, json_response

GROUPS = {"day": "day", "model": "model", "key": "key_id", "user": "user_id"}
SUMS = ("requests", "partial_requests", "unpriced_requests", "input_tokens", "output_tokens",
        "cache_write_tokens", "cache_read_tokens", "cost_micros")
MAX_ROWS = 10_000
MAX_FILTER_LEN = 200
QUERY_TIMEOUT_S = 10.0

_RAW_COLUMNS = (
    "(ts AT TIME ZONE 'UTC')::date AS day, user_id, key_id, model, 1 AS requests, "
    "partial::int AS partial_requests, (NOT priced)::int AS unpriced_requests, input_tokens, output_tokens, "
    "cache_write_tokens, cache_read_tokens, cost_micros"
)
_DAILY_COLUMNS = "day, user_id, key_id, model, " + ", ".join(SUMS)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    start: datetime | None
    end: datetime | None
    user_id: str | None
    key_id: str | None
    model: str | None
    group_by: tuple[str, ...]


def _instant(value: str, name: str) -> datetime:
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), UTC)
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise bad_request(f"{name}: an ISO 8601 date or date-time is required.", field=name) from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _filter(q: Any, name: str) -> str | None:
    value = q.get(name)
    if value is None:
        return None
    if not value or len(value) > MAX_FILTER_LEN:
        raise bad_request(f"{name}: must be 1 to {MAX_FILTER_LEN} characters.", field=name)
    return str(value)


KNOWN_PARAMS = frozenset({"from", "to", "user_id", "key_id", "model", "group_by"})


def parse_query(q: Any) -> UsageQuery:
    for name in q:
        if name not in KNOWN_PARAMS:
            raise bad_request(f"{name}: unknown query parameter.", field=name)
    start = _instant(q["from"], "from") if "from" in q else None
    end = _instant(q["to"], "to") if "to" in q else None
    if start is not None and end is not None and end < start:
        raise bad_request("to: must not be before from.", field="to")
    group_by = tuple(g for g in (q.get("group_by") or "day").split(",") if g)
    if not group_by or any(g not in GROUPS for g in group_by) or len(set(group_by)) != len(group_by):
        raise bad_request("group_by: one or more of day, model, key, user (comma separated).", field="group_by")
    return UsageQuery(start, end, _filter(q, "user_id"), _filter(q, "key_id"), _filter(q, "model"), group_by)


def _midnight(d: date) -> datetime:
    return datetime.combine(d, time(), UTC)


def build_sql(uq: UsageQuery) -> tuple[str, list[Any]]:
    """One query: whole days from the rollup, partial edge days from the ledger, then grouped."""
    args: list[Any] = []

    def arg(v: Any) -> str:
        args.append(v)
        return f"${len(args)}"

    filters = []
    for col, v in (("user_id", uq.user_id), ("key_id", uq.key_id), ("model", uq.model)):
        if v is not None:
            filters.append(f"{col} = {arg(v)}")

    # Whole days: [first_day, end_day) in the rollup.
    first_day = None
    if uq.start is not None:
        first_day = uq.start.date() if uq.start == _midnight(uq.start.date()) else uq.start.date() + timedelta(1)
    end_day = uq.end.date() if uq.end is not None else None
    parts: list[str] = []
    if first_day is not None and end_day is not None and first_day >= end_day:
        raws = [(uq.start, uq.end)]  # within one day (or two partial ones): the ledger only
    else:
        conds = list(filters)
        if first_day is not None:
            conds.append(f"day >= {arg(first_day)}")
        if end_day is not None:
            conds.append(f"day < {arg(end_day)}")
        where = " WHERE " + " AND ".join(conds) if conds else ""
        parts.append(f"SELECT {_DAILY_COLUMNS} FROM usage_daily{where}")  # noqa: S608 - placeholders only
        raws = []
        if uq.start is not None and first_day is not None and uq.start < _midnight(first_day):
            raws.append((uq.start, _midnight(first_day)))
        if uq.end is not None and end_day is not None and uq.end > _midnight(end_day):
            raws.append((_midnight(end_day), uq.end))
    for lo, hi in raws:
        conds = [*filters, f"ts >= {arg(lo)}", f"ts < {arg(hi)}"]
        where = " AND ".join(conds)
        parts.append(f"SELECT {_RAW_COLUMNS} FROM usage_ledger WHERE {where}")  # noqa: S608 - placeholders only
    cols = ", ".join(GROUPS[g] for g in uq.group_by)
    sums = ", ".join(f"sum({s})::bigint AS {s}" for s in SUMS)
    sql = (
        f"SELECT {cols}, {sums} FROM ({' UNION ALL '.join(parts)}) u "  # noqa: S608 - identifiers are constants
        f"GROUP BY {cols} ORDER BY {cols} LIMIT {MAX_ROWS + 1}"
    )
    return sql, args


def _row(r: Any, group_by: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for g in group_by:
        v = r[GROUPS[g]]
        out[GROUPS[g] if g != "day" else "day"] = v.isoformat() if isinstance(v, date) else v
    for s in SUMS:
        out[s] = r[s] or 0
    out["cost_usd"] = out["cost_micros"] / 1_000_000
    return out


async def _report(request: web.Request, uq: UsageQuery) -> web.Response:
    sql, args = build_sql(uq)
    async with connect(request) as conn:
        records = await conn.fetch(sql, *args, timeout=QUERY_TIMEOUT_S)
    truncated = len(records) > MAX_ROWS
    data = [_row(r, uq.group_by) for r in records[:MAX_ROWS]]
    totals: dict[str, Any] = {s: sum(d[s] for d in data) for s in SUMS}
    totals["cost_usd"] = totals["cost_micros"] / 1_000_000
    return json_response({
        "from": uq.start.isoformat() if uq.start else None,
        "to": uq.end.isoformat() if uq.end else None,
        "group_by": list(uq.group_by),
        "filters": {"user_id": uq.user_id, "key_id": uq.key_id, "model": uq.model},
        "data": data,
        "totals": totals,
        "truncated": truncated,
    })


async def admin_usage(request: web.Request) -> web.Response:
    await require_admin(request)
    return await _report(request, parse_query(request.query))


async def me_usage(request: web.Request) -> web.Response:
    ident = await require_user(request)
    uq = parse_query(request.query)
    if uq.user_id is not None and uq.user_id != ident.user_id:
        raise bad_request("user_id: /me/usage only reports your own usage.", field="user_id")
    return await _report(request, UsageQuery(uq.start, uq.end, ident.user_id, uq.key_id, uq.model, uq.group_by))


def setup(app: web.Application) -> None:
    app.router.add_get("/admin/usage", admin_usage)
    app.router.add_get("/me/usage", me_usage)
