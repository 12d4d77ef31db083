"""GET /admin/usage/tags and /me/usage/tags: usage filtered and grouped by cost-attribution tags.

Same parameters as /admin/usage (``from``, ``to``, ``user_id``, ``key_id``,
``model``), plus:

- ``tag=name=value`` (repeatable): only records carrying every such tag;
  ``tag=name`` alone: records carrying tag ``name`` with any value;
- ``team_id``: only the usage of that team's (current) members;
- ``group_by``: ``day``, ``model``, ``key``, ``user``, ``team`` (the user's
  current team) and ``tag:NAME`` (the value of tag NAME, null for records
  without it), comma separated.

``GET /admin/teams/{id}/usage`` is the same report for one team, open to
that team's team admin.

Tags live on ledger rows (not in the rollups), so these reports read the
ledger of the chosen range (GIN index on ``tags`` for the filters).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from aiohttp import web

from gateway import keys
from gateway.accounting import reports
from gateway.accounting.tags import TagError
from gateway.admin.common import connect
from gateway.admin.teams import team_access
from gateway.auth.guard import require_admin, require_user
from gateway.auth.responses import bad_request, json_response

PARAMS = frozenset({"from", "to", "user_id", "key_id", "model", "team_id", "tag", "group_by"})
MAX_TAG_FILTERS = 10


@dataclass(frozen=True, slots=True)
class TagQuery:
    base: reports.UsageQuery
    equal: dict[str, str]  # tag=value filters
    present: list[str]  # tag-present filters
    group_by: tuple[str, ...]  # day, model, key, user, team, tag:NAME
    team_id: str | None = None  # members of this team (current membership)


def parse(request: web.Request) -> TagQuery:
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
            elif g not in reports.GROUPS and g != "team":
                raise TagError("group_by: one or more of day, model, key, user, team, tag:NAME (comma separated).")
    except TagError as exc:
        raise bad_request(str(exc), field="group_by") from None
    if not group_by or len(set(group_by)) != len(group_by):
        raise bad_request("group_by: one or more of day, model, key, user, team, tag:NAME (comma separated).",
                          field="group_by")
    base = {k: v for k, v in q.items() if k in reports.KNOWN_PARAMS and k != "group_by"}
    team_id = None
    if "team_id" in q:
        try:
            team_id = str(uuid.UUID(q["team_id"]))
        except ValueError:
            raise bad_request("team_id: must be a team's id.", field="team_id") from None
    return TagQuery(reports.parse_query(base), equal, present, group_by, team_id)


# Team of each ledger row's user (current membership); config-file users have none.
_TEAMS = "LEFT JOIN (SELECT id::text AS uid, team_id::text AS team FROM users WHERE team_id IS NOT NULL) tm " \
         "ON tm.uid = usage_ledger.user_id"


def build_sql(tq: TagQuery) -> tuple[str, list[Any]]:
    uq, equal, present, group_by = tq.base, tq.equal, tq.present, tq.group_by
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
    if tq.team_id is not None:
        conds.append(f"tm.team = {arg(tq.team_id)}")
    where = " WHERE " + " AND ".join(conds) if conds else ""
    cols = []
    for i, g in enumerate(group_by):
        if g.startswith("tag:"):
            cols.append(f"tags ->> {arg(g[4:])} AS g{i}")
        else:
            cols.append(f"{'team_id' if g == 'team' else reports.GROUPS[g]} AS g{i}")
    positions = ", ".join(str(i + 1) for i in range(len(group_by)))
    sums = ", ".join(f"sum({s})::bigint AS {s}" for s in reports.SUMS)
    sql = (
        f"SELECT {', '.join(cols)}, {sums} FROM (SELECT {reports._RAW_COLUMNS}, tags, tm.team AS team_id "  # noqa: S608 - placeholders only
        f"FROM usage_ledger {_TEAMS}{where}) u GROUP BY {positions} ORDER BY {positions} LIMIT {reports.MAX_ROWS + 1}"
    )
    return sql, args


def _usd(row: dict[str, Any]) -> float | None:
    """USD from whichever cost sum the main report has (micro-dollars today; the money work moves it to pico)."""
    if "cost_micros" in row:
        return float(row["cost_micros"]) / 1_000_000
    if "cost_pico" in row:
        return float(row["cost_pico"]) / 1_000_000_000_000
    return None


def _name(g: str) -> str:
    if g == "team":
        return "team_id"
    return g if g.startswith("tag:") or g == "day" else reports.GROUPS[g]


async def report(request: web.Request, tq: TagQuery) -> web.Response:
    uq, equal, present, group_by = tq.base, tq.equal, tq.present, tq.group_by
    sql, args = build_sql(tq)
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
        row["cost_usd"] = _usd(row)
        data.append(row)
    totals: dict[str, Any] = {s: sum(d[s] for d in data) for s in reports.SUMS}
    totals["cost_usd"] = _usd(totals)
    return json_response({
        "from": uq.start.isoformat() if uq.start else None,
        "to": uq.end.isoformat() if uq.end else None,
        "group_by": list(group_by),
        "filters": {"user_id": uq.user_id, "key_id": uq.key_id, "model": uq.model, "team_id": tq.team_id,
                    "tags": equal, "tags_present": present},
        "data": data,
        "totals": totals,
        "truncated": truncated,
    })


async def admin_usage_by_tag(request: web.Request) -> web.Response:
    await require_admin(request)
    return await report(request, parse(request))


async def me_usage_by_tag(request: web.Request) -> web.Response:
    ident = await require_user(request)
    tq = parse(request)
    uq = tq.base
    if uq.user_id is not None and uq.user_id != ident.user_id:
        raise bad_request("user_id: /me/usage/tags only reports your own usage.", field="user_id")
    own = reports.UsageQuery(uq.start, uq.end, ident.user_id, uq.key_id, uq.model, uq.group_by)
    return await report(request, TagQuery(own, tq.equal, tq.present, tq.group_by))


async def team_usage(request: web.Request) -> web.Response:
    """One team's usage (admins, or that team's team admin)."""
    _, team_id = await team_access(request)
    tq = parse(request)
    return await report(request, replace(tq, team_id=team_id))


def setup(app: web.Application) -> None:
    app.router.add_get("/admin/usage/tags", admin_usage_by_tag)
    app.router.add_get("/me/usage/tags", me_usage_by_tag)
    app.router.add_get("/admin/teams/{id}/usage", team_usage)
