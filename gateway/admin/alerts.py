"""/admin/alerts: spend alert rules and their events (deliveries with status).

- ``POST /admin/alerts`` ``{"scope": "key"|"user"|"team", "target_id": ..., "name": ...,
  "budget_usd": 100 (optional: else the target's own budget), "period": "day"|"month"|"total"
  (optional), "thresholds": [50, 80, 100] (optional), "webhook_url": "https://..." (optional
  when [alerts] webhook_url is set)}``
- ``GET /admin/alerts`` (``scope``, ``target_id``, ``limit``, ``cursor``), ``GET/PATCH/DELETE /admin/alerts/{id}``
- ``GET /admin/alerts/{id}/events`` and ``GET /admin/alert-events`` (``status``, ``rule_id``,
  ``limit``, ``before``): every fired event with its delivery status, attempts and last error.
"""

from __future__ import annotations

import math
import uuid
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from gateway import keys as appkeys
from gateway.admin import validation as v
from gateway.admin.common import connect
from gateway.alerts import store
from gateway.auth.guard import require_admin
from gateway.auth.responses import bad_request, json_response, not_found, read_json_object
from gateway.stores import audit

CREATE_FIELDS = frozenset({"scope", "target_id", "name", "budget_usd", "period", "thresholds", "webhook_url"})
PATCH_FIELDS = frozenset({"name", "budget_usd", "period", "thresholds", "webhook_url", "enabled"})
SCOPES = ("key", "user", "team")
PERIODS = ("day", "month", "total")
EVENT_STATUSES = ("pending", "delivered", "failed")
MAX_THRESHOLDS = 10


def _url(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 2000:
        raise bad_request("webhook_url: must be an http(s) URL.", field="webhook_url")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_request("webhook_url: must be an http(s) URL.", field="webhook_url")
    return value


def _thresholds(value: Any) -> tuple[int, ...]:
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_THRESHOLDS
            or any(isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 1000 for t in value)):
        raise bad_request(f"thresholds: 1 to {MAX_THRESHOLDS} integer percentages from 1 to 1000.",
                          field="thresholds")
    return tuple(sorted(set(value)))


def _budget(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise bad_request("budget_usd: must be a number > 0, or null for the target's own budget.",
                          field="budget_usd")
    return max(1, round(value * 1_000_000))


def _period(value: Any) -> str | None:
    if value is not None and value not in PERIODS:
        raise bad_request("period: must be 'day', 'month', 'total' or null.", field="period")
    return value  # type: ignore[no-any-return]


async def create(request: web.Request) -> web.Response:
    ident = await require_admin(request)
    cfg = request.app[appkeys.CONFIG].alerts
    doc = await read_json_object(request)
    v.only(doc, CREATE_FIELDS, "on an alert")
    scope = v.require(doc, "scope")
    if scope not in SCOPES:
        raise bad_request("scope: must be 'key', 'user' or 'team'.", field="scope")
    try:
        target_id = str(uuid.UUID(str(v.require(doc, "target_id"))))
    except ValueError:
        raise bad_request("target_id: must be the id of a key, user or team.", field="target_id") from None
    url = doc.get("webhook_url") or cfg.webhook_url
    if not url:
        raise bad_request("webhook_url: required ([alerts] webhook_url is not set).", field="webhook_url")
    fields: dict[str, Any] = {
        "scope": scope, "target_id": target_id, "name": v.name(doc.get("name", "")),
        "budget_micros": _budget(doc.get("budget_usd")), "period": _period(doc.get("period")),
        "thresholds": _thresholds(doc["thresholds"]) if "thresholds" in doc else tuple(cfg.thresholds),
        "webhook_url": _url(url),
    }
    async with connect(request, transaction=True) as conn:
        if not await store.target_exists(conn, scope, target_id):
            raise bad_request(f"target_id: no such {scope}.", field="target_id")
        rule = await store.create(conn, created_by=ident.user_id, **fields)
        await audit.record(conn, ident.actor(request), "alert.create", "alert", rule.id,
                           {"scope": scope, "target_id": target_id})
    return json_response(rule.public(), status=201)


async def list_rules(request: web.Request) -> web.Response:
    await require_admin(request)
    limit, after = v.page(request)
    scope = v.query_choice(request, "scope", SCOPES)
    target = v.optional_uuid(request, "target_id")
    async with connect(request) as conn:
        rules = await store.list_rules(conn, limit=limit, after=after, scope=scope, target_id=target)
    return json_response({"data": [r.public() for r in rules], "next_cursor": v.next_cursor(rules, limit)})


async def get_rule(request: web.Request) -> web.Response:
    await require_admin(request)
    rule_id = v.object_id(request, "Alert")
    async with connect(request) as conn:
        rule = await store.get(conn, rule_id)
    if rule is None:
        raise not_found("Alert")
    return json_response(rule.public())


async def patch_rule(request: web.Request) -> web.Response:
    ident = await require_admin(request)
    rule_id = v.object_id(request, "Alert")
    doc = await read_json_object(request)
    v.only(doc, PATCH_FIELDS, "on an alert")
    changes: dict[str, Any] = {}
    if "name" in doc:
        changes["name"] = v.name(doc["name"])
    if "budget_usd" in doc:
        changes["budget_micros"] = _budget(doc["budget_usd"])
    if "period" in doc:
        changes["period"] = _period(doc["period"])
    if "thresholds" in doc:
        changes["thresholds"] = _thresholds(doc["thresholds"])
    if "webhook_url" in doc:
        changes["webhook_url"] = _url(doc["webhook_url"])
    if "enabled" in doc:
        changes["enabled"] = v.boolean(doc["enabled"], "enabled")
    async with connect(request, transaction=True) as conn:
        rule = await store.update(conn, rule_id, changes)
        if rule is None:
            raise not_found("Alert")
        await audit.record(conn, ident.actor(request), "alert.update", "alert", rule_id, {"fields": sorted(doc)})
    return json_response(rule.public())


async def delete_rule(request: web.Request) -> web.Response:
    ident = await require_admin(request)
    rule_id = v.object_id(request, "Alert")
    async with connect(request, transaction=True) as conn:
        if not await store.delete(conn, rule_id):
            raise not_found("Alert")
        await audit.record(conn, ident.actor(request), "alert.delete", "alert", rule_id, {})
    return web.Response(status=204)


def _before(request: web.Request) -> int | None:
    raw = request.query.get("before")
    if raw is None:
        return None
    if not raw.isdigit():
        raise bad_request("before: must be an event id.", field="before")
    return int(raw)


async def list_events(request: web.Request) -> web.Response:
    await require_admin(request)
    limit, _ = v.page(request)
    one_rule = "id" in request.match_info  # /admin/alerts/{id}/events
    rule_id = v.object_id(request, "Alert") if one_rule else v.optional_uuid(request, "rule_id")
    status = v.query_choice(request, "status", EVENT_STATUSES)
    async with connect(request) as conn:
        if one_rule and await store.get(conn, rule_id or "") is None:
            raise not_found("Alert")
        events = await store.list_events(conn, limit=limit, rule_id=rule_id, status=status,
                                         before_id=_before(request))
    nxt = str(events[-1]["id"]) if len(events) == limit else None
    return json_response({"data": events, "next_before": nxt})


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/alerts", list_rules)
    r.add_post("/admin/alerts", create)
    r.add_get("/admin/alerts/{id}", get_rule)
    r.add_patch("/admin/alerts/{id}", patch_rule)
    r.add_delete("/admin/alerts/{id}", delete_rule)
    r.add_get("/admin/alerts/{id}/events", list_events)
    r.add_get("/admin/alert-events", list_events)
