"""/admin/audit: the control-plane audit log, newest first (admins only)."""

from __future__ import annotations

from aiohttp import web

from gateway.admin import validation as v
from gateway.admin.common import connect
from gateway.auth.guard import require_admin
from gateway.auth.responses import bad_request, json_response
from gateway.stores import audit


async def list_audit(request: web.Request) -> web.Response:
    await require_admin(request)
    raw = request.query.get("limit", str(v.DEFAULT_PAGE))
    if not raw.isdigit() or not 1 <= int(raw) <= v.MAX_PAGE:
        raise bad_request(f"limit: must be an integer from 1 to {v.MAX_PAGE}.", field="limit")
    before = request.query.get("before")
    if before is not None and not before.isdigit():
        raise bad_request("before: must be an audit entry id.", field="before")
    target = v.query_text(request, "target_id")
    async with connect(request) as conn:
        rows = await audit.list_page(conn, limit=int(raw), before_id=int(before) if before else None,
                                     target_id=target)
    nxt = str(rows[-1]["id"]) if len(rows) == int(raw) else None
    return json_response({"data": rows, "next_before": nxt})
