"""GET /admin/usage and /me/usage: requests, tokens and cost, filtered and grouped.

Query parameters (all optional):

- ``from``, ``to``: ISO 8601 date or date-time (UTC when no offset is given);
  ``from`` inclusive, ``to`` exclusive.  Default: everything.
- ``user_id``, ``key_id``, ``model``: exact filters (``/me/usage`` is always
  the caller's own user; ``key_id`` there can only narrow it further).
- ``group_by``: ``day``, ``model``, ``key``, ``user``, or several joined with
  commas (``day,model``).  Default ``day``.  Grouped by key, each row also
  names the key: ``key_name`` and ``key_prefix`` (its 12-character display
  prefix), null for a config-file key (whose id is its name).

Cost is exact: ``cost_pico`` (pico-dollars, an integer as a string) and
``cost_usd`` (the same as an exact decimal string, e.g. ``"0.0000002"``);
``cost_micros`` (each record rounded up to a micro-dollar) is the previous
release's figure, kept for compatibility.

Fast on tens of millions of rows: whole UTC days come from the ``usage_daily``
rollup, whole hours of the partial edge days from ``usage_hourly``, and only
the sub-hour slices at the very edges of a range from the ledger itself.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from aiohttp import web

from gateway.accounting.money import usd
from gateway.admin.common import connect
from gateway.auth.guard import require_admin, require_user
from gateway.auth.responses import bad_request, json_response

GROUPS = {"day": "day", "model": "model", "key": "key_id", "user": "user_id"}
SUMS = ("requests", "partial_requests", "unpriced_requests", "input_tokens", "output_tokens",
        "cache_write_tokens", "cache_read_tokens", "cost_micros", "cost_pico")
# Summed as numeric (a bigint sum of pico-dollars could overflow) and reported as exact strings.
_EXACT = frozenset({"cost_pico"})
MAX_ROWS = 10_000
MAX_FILTER_LEN = 200
QUERY_TIMEOUT_S = 10.0

_RAW_COLUMNS = (
    "(ts AT TIME ZONE 'UTC')::date AS day, user_id, key_id, model, 1 AS requests, "
    "partial::int AS partial_requests, (NOT priced)::int AS unpriced_requests, input_tokens, output_tokens, "
    "cache_write_tokens, cache_read_tokens, cost_micros, cost_pico"
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


KNOWN_PARAMS = frozenset({"from", "to", "user_id", "key_id", "model", "group_by", "format"})
FORMATS = ("json", "csv")


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


def _ceil(t: datetime, unit: timedelta) -> datetime:
    floor = _floor(t, unit)
    return floor if floor == t else floor + unit


def _floor(t: datetime, unit: timedelta) -> datetime:
    if unit == DAY:
        return _midnight(t.date())
    return t.replace(minute=0, second=0, microsecond=0)


DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
_HOURLY_COLUMNS = "(hour AT TIME ZONE 'UTC')::date AS day, user_id, key_id, model, " + ", ".join(SUMS)


def plan_ranges(start: datetime | None, end: datetime | None) -> list[tuple[str, datetime | None, datetime | None]]:
    """Split [start, end) into (source, lo, hi): whole days -> daily, whole hours -> hourly, rest -> ledger."""
    out: list[tuple[str, datetime | None, datetime | None]] = []

    def hours(lo: datetime, hi: datetime) -> None:
        h_lo, h_hi = _ceil(lo, HOUR), _floor(hi, HOUR)
        if h_lo < h_hi:
            out.append(("hourly", h_lo, h_hi))
            if lo < h_lo:
                out.append(("ledger", lo, h_lo))
            if h_hi < hi:
                out.append(("ledger", h_hi, hi))
        elif lo < hi:
            out.append(("ledger", lo, hi))

    d_lo = _ceil(start, DAY) if start is not None else None
    d_hi = _floor(end, DAY) if end is not None else None
    if start is not None and end is not None and d_lo is not None and d_hi is not None and d_lo >= d_hi:
        hours(start, end)
        return out
    out.append(("daily", d_lo, d_hi))
    if start is not None and d_lo is not None and start < d_lo:
        hours(start, d_lo)
    if end is not None and d_hi is not None and d_hi < end:
        hours(d_hi, end)
    return out


_TOTALS_COLUMNS = "day, NULL::text AS user_id, NULL::text AS key_id, model, " + ", ".join(SUMS)
_USERS_COLUMNS = "day, user_id, NULL::text AS key_id, model, " + ", ".join(SUMS)


def daily_source(uq: UsageQuery) -> tuple[str, str]:
    """The smallest daily rollup that answers ``uq`` (migration 0041): by (day, model) when no key
    or user is asked for, by (day, user, model) when no key is, else the full one."""
    groups = set(uq.group_by)
    if uq.key_id is None and "key" not in groups:
        if uq.user_id is None and "user" not in groups:
            return "usage_daily_totals", _TOTALS_COLUMNS
        return "usage_daily_users", _USERS_COLUMNS
    return "usage_daily", _DAILY_COLUMNS


_MONTHLY_COLUMNS = "month AS day, user_id, key_id, NULL::text AS model, " + ", ".join(SUMS)


def monthly_eligible(uq: UsageQuery) -> bool:
    """Whole months can come from usage_monthly_keys: nothing asks for a model or a day."""
    return uq.model is None and "model" not in uq.group_by and "day" not in uq.group_by


def _month_floor(d: datetime) -> datetime:
    return datetime(d.year, d.month, 1, tzinfo=UTC)


def _next_month(d: datetime) -> datetime:
    return datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC)


def split_months(lo: datetime | None, hi: datetime | None) -> list[tuple[str, datetime | None, datetime | None]]:
    """A whole-day range [lo, hi) as whole months (monthly rollup) plus the days at its edges (daily).
    An open end stays open: the monthly rollup holds nothing beyond what has been recorded."""
    m_lo = None if lo is None else (lo if lo == _month_floor(lo) else _next_month(lo))
    m_hi = None if hi is None else _month_floor(hi)
    if m_lo is not None and m_hi is not None and m_lo >= m_hi:
        return [("daily", lo, hi)]
    out: list[tuple[str, datetime | None, datetime | None]] = [("monthly", m_lo, m_hi)]
    if lo is not None and m_lo is not None and lo < m_lo:
        out.append(("daily", lo, m_lo))
    if hi is not None and m_hi is not None and m_hi < hi:
        out.append(("daily", m_hi, hi))
    return out


def build_sql(uq: UsageQuery) -> tuple[str, list[Any]]:
    """One query: whole days from the daily rollup, whole hours of edge days from the hourly one,
    sub-hour edges from the ledger; then grouped."""
    args: list[Any] = []

    def arg(v: Any) -> str:
        args.append(v)
        return f"${len(args)}"

    filters = []
    for col, v in (("user_id", uq.user_id), ("key_id", uq.key_id), ("model", uq.model)):
        if v is not None:
            filters.append(f"{col} = {arg(v)}")

    parts: list[str] = []
    ranges = plan_ranges(uq.start, uq.end)
    if monthly_eligible(uq):
        ranges = [r for rng in ranges for r in (split_months(rng[1], rng[2]) if rng[0] == "daily" else [rng])]
    for source, lo, hi in ranges:
        conds = list(filters)
        lo_v: Any
        hi_v: Any
        if source == "monthly":
            table, cols, col = "usage_monthly_keys", _MONTHLY_COLUMNS, "month"
            lo_v, hi_v = (lo.date() if lo is not None else None), (hi.date() if hi is not None else None)
        elif source == "daily":
            table, cols, col = (*daily_source(uq), "day")
            lo_v = lo.date() if lo is not None else None
            hi_v = hi.date() if hi is not None else None
        else:
            table, cols, col = (("usage_hourly", _HOURLY_COLUMNS, "hour") if source == "hourly"
                                else ("usage_ledger", _RAW_COLUMNS, "ts"))
            lo_v, hi_v = lo, hi
        if lo_v is not None:
            conds.append(f"{col} >= {arg(lo_v)}")
        if hi_v is not None:
            conds.append(f"{col} < {arg(hi_v)}")
        where = " WHERE " + " AND ".join(conds) if conds else ""
        parts.append(f"SELECT {cols} FROM {table}{where}")  # noqa: S608 - placeholders only
    group_cols = ", ".join(GROUPS[g] for g in uq.group_by)
    sums = ", ".join(f"sum({s})::{'numeric' if s in _EXACT else 'bigint'} AS {s}" for s in SUMS)
    sql = (
        f"SELECT {group_cols}, {sums} FROM ({' UNION ALL '.join(parts)}) u "  # noqa: S608 - constants
        f"GROUP BY {group_cols} ORDER BY {group_cols} LIMIT {MAX_ROWS + 1}"
    )
    return with_key_names(sql, uq), args


def with_key_names(sql: str, uq: UsageQuery) -> str:
    """Grouped by key: the key's name and display prefix beside its id (one join on the grouped rows)."""
    if "key" not in uq.group_by:
        return sql
    order = ", ".join(f"r.{GROUPS[g]}" for g in uq.group_by)
    return (
        f"SELECT r.*, k.name AS key_name, k.prefix AS key_prefix FROM ({sql}) r "  # noqa: S608 - constants
        f"LEFT JOIN access_keys k ON k.id::text = r.key_id ORDER BY {order}"
    )


def _row(r: Any, group_by: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for g in group_by:
        v = r[GROUPS[g]]
        out[GROUPS[g] if g != "day" else "day"] = v.isoformat() if isinstance(v, date) else v
    if "key" in group_by:
        out["key_name"], out["key_prefix"] = r["key_name"], r["key_prefix"]
    for s in SUMS:
        out[s] = int(r[s] or 0)
    return out


def _exact(row: dict[str, Any]) -> dict[str, Any]:
    """Pico-dollars as an exact integer string and USD as an exact decimal string (JSON numbers
    lose precision past 2^53 in most clients)."""
    row["cost_usd"] = usd(row["cost_pico"])
    row["cost_pico"] = str(row["cost_pico"])
    return row


async def _report(request: web.Request, uq: UsageQuery) -> web.Response:
    fmt = request.query.get("format", "json")
    if fmt not in FORMATS:
        raise bad_request("format: json or csv.", field="format")
    sql, args = build_sql(uq)
    async with connect(request) as conn:
        records = await conn.fetch(sql, *args, timeout=QUERY_TIMEOUT_S)
    truncated = len(records) > MAX_ROWS
    rows = [_row(r, uq.group_by) for r in records[:MAX_ROWS]]
    if fmt == "csv":
        return csv_response([_exact(dict(d)) for d in rows], uq.group_by, truncated)
    totals: dict[str, Any] = _exact({s: sum(d[s] for d in rows) for s in SUMS})
    data = [_exact(d) for d in rows]
    return json_response({
        "from": uq.start.isoformat() if uq.start else None,
        "to": uq.end.isoformat() if uq.end else None,
        "group_by": list(uq.group_by),
        "filters": {"user_id": uq.user_id, "key_id": uq.key_id, "model": uq.model},
        "data": data,
        "totals": totals,
        "truncated": truncated,
    })


def csv_response(data: list[dict[str, Any]], group_by: tuple[str, ...], truncated: bool) -> web.Response:
    """The report's rows as CSV (one header line; cost in exact pico-dollars and in USD)."""
    buf = io.StringIO()
    cols = [GROUPS[g] if g != "day" else "day" for g in group_by] + [*SUMS, "cost_usd"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for d in data:
        w.writerow([_csv_cell(d[c]) for c in cols])
    headers = {"content-disposition": 'attachment; filename="usage.csv"', "x-truncated": str(truncated).lower()}
    return web.Response(text=buf.getvalue(), content_type="text/csv", headers=headers)


def _csv_cell(v: Any) -> Any:
    # Keep a spreadsheet from running a model or key name as a formula.
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


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
