"""GET /admin/usage/tags and /me/usage/tags: usage filtered and grouped by cost-attribution tags.

Same parameters as /admin/usage (``from``, ``to``, ``user_id``, ``key_id``,
``model``), plus:

- ``tag=name=value`` (repeatable): only records carrying every such tag;
  ``tag=name`` alone: records carrying tag ``name`` with any value;
- ``group_by``: ``day``, ``model``, ``key``, ``user`` and ``tag:NAME`` (the
  value of tag NAME, null for records without it), comma separated.

Tags live on ledger rows (not in the rollups), so these reports read the
ledger of the chosen range (GIN index on ``tags`` for the filters).
"""

from __future__ import annotations

from datetime import date
from typing import Any

from aiohttp import web

from gateway import keys
from gateway.accounting import reports
from gateway.accounting.tags import TagError
from gateway.admin.common import connect
from gateway.auth.guard import require_admin, require_user
from gateway.auth.responses import bad_request, json_response

PARAMS = frozenset({"from", "to", "user_id", "key_id", "model", "tag", "group_by"})
MAX_TAG_FILTERS = 10


def parse(request: web.Request) -> tuple[reports.UsageQuery, dict[str, str], list[str], tuple[str, ...]]:
    """(base query, tag=value filters, tag-present filters, group_by with tag:NAME entries)."""
    q = request.query
    for name in q:
        if name not in PARAMS:
            raise bad_request(f"{name}: unknown query parameter.", field=name)
    rules = request.app[keys.TAGS].rules
    equal: dict[str, str] = {}
    present: list[str] = []
    filters = q.getall("tag", [])
    if len(filters) > MAX_TAG_FILTERS:
        raise bad_request(f"tag: at most {MAX_TAG_FILTERS} tag filters.", field="tag")
    try:
        for raw in filters:
            name, eq, value = raw.partition("=")
            rules.name(name, "tag")
            if eq:
                equal[name] = rules.value(name, value, "tag")
            else:
                present.append(name)
    except TagError as exc:
        raise bad_request(str(exc), field="tag") from None
    group_by = tuple(g for g in (q.get("group_by") or "day").split(",") if g)
    try:
        for g in group_by:
            if g.startswith("tag:"):
                rules.name(g[4:], "group_by")
            elif g not in reports.GROUPS:
                raise TagError("group_by: one or more of day, model, key, user, tag:NAME (comma separated).")
    except TagError as exc:
        raise bad_request(str(exc), field="group_by") from None
    if not group_by or len(set(group_by)) != len(group_by):
        raise bad_request("group_by: one or more of day, model, key, user, tag:NAME (comma separated).",
                          field="group_by")
    base = {k: v for k, v in q.items() if k in reports.KNOWN_PARAMS and k != "group_by"}
    uq = reports.parse_query(base)
    return uq, equal, present, group_by


def build_sql(uq: reports.UsageQuery, equal: dict[str, str], present: list[str],
              group_by: tuple[str, ...]) -> tuple[str, list[Any]]:
    args: list[Any] = []

    def arg(v: Any) -> str:
        args.append(v)
        return f"${len(args)}"

    conds: list[str] = []
    for col, v in (("user_id", uq.user_id), ("key_id", uq.key_id), ("model", uq.model)):
        if v is not None:
            conds.append(f"{col} = {arg(v)}")
    if uq.start is not None:
        conds.append(f"ts >= {arg(uq.start)}")
    if uq.end is not None:
        conds.append(f"ts < {arg(uq.end)}")
    if equal:
        conds.append(f"tags @> {arg(equal)}::jsonb")
    for name in present:
        conds.append(f"tags ? {arg(name)}")
    where = " WHERE " + " AND ".join(conds) if conds else ""
    cols = []
    for i, g in enumerate(group_by):
        cols.append(f"tags ->> {arg(g[4:])} AS g{i}" if g.startswith("tag:") else f"{reports.GROUPS[g]} AS g{i}")
    positions = ", ".join(str(i + 1) for i in range(len(group_by)))
    sums = ", ".join(f"sum({s})::bigint AS {s}" for s in reports.SUMS)
    sql = (
        f"SELECT {', '.join(cols)}, {sums} FROM (SELECT {reports._RAW_COLUMNS}, tags "  # noqa: S608 - placeholders only
        f"FROM usage_ledger{where}) u GROUP BY {positions} ORDER BY {positions} LIMIT {reports.MAX_ROWS + 1}"
    )
    return sql, args


def _name(g: str) -> str:
    return g if g.startswith("tag:") or g == "day" else reports.GROUPS[g]


async def _report(request: web.Request, uq: reports.UsageQuery, equal: dict[str, str], present: list[str],
                  group_by: tuple[str, ...]) -> web.Response:
    sql, args = build_sql(uq, equal, present, group_by)
    async with connect(request) as conn:
        records = await conn.fetch(sql, *args, timeout=reports.QUERY_TIMEOUT_S)
    truncated = len(records) > reports.MAX_ROWS
    data = []
    for r in records[: reports.MAX_ROWS]:
        row: dict[str, Any] = {}
        for i, g in enumerate(group_by):
            v = r[f"g{i}"]
            row[_name(g)] = v.isoformat() if isinstance(v, date) else v
        for s in reports.SUMS:
            row[s] = r[s] or 0
        row["cost_usd"] = row["cost_micros"] / 1_000_000
        data.append(row)
    totals: dict[str, Any] = {s: sum(d[s] for d in data) for s in reports.SUMS}
    totals["cost_usd"] = totals["cost_micros"] / 1_000_000
    return json_response({
        "from": uq.start.isoformat() if uq.start else None,
        "to": uq.end.isoformat() if uq.end else None,
        "group_by": list(group_by),
        "filters": {"user_id": uq.user_id, "key_id": uq.key_id, "model": uq.model, "tags": equal,
                    "tags_present": present},
        "data": data,
        "totals": totals,
        "truncated": truncated,
    })


async def admin_usage_by_tag(request: web.Request) -> web.Response:
    await require_admin(request)
    return await _report(request, *parse(request))


async def me_usage_by_tag(request: web.Request) -> web.Response:
    ident = await require_user(request)
    uq, equal, present, group_by = parse(request)
    if uq.user_id is not None and uq.user_id != ident.user_id:
        raise bad_request("user_id: /me/usage/tags only reports your own usage.", field="user_id")
    own = reports.UsageQuery(uq.start, uq.end, ident.user_id, uq.key_id, uq.model, uq.group_by)
    return await _report(request, own, equal, present, group_by)


def setup(app: web.Application) -> None:
    app.router.add_get("/admin/usage/tags", admin_usage_by_tag)
    app.router.add_get("/me/usage/tags", me_usage_by_tag)
