"""/me: one's own account.  Only the name and the password can be changed here."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.admin import validation as v
from gateway.admin.common import connect
from gateway.auth import sessions
from gateway.auth.guard import require_user
from gateway.auth.handlers import PASSWORDS
from gateway.auth.responses import api_error, json_response, not_found, read_json_object
from gateway.stores import audit, users

PATCH_FIELDS = frozenset({"name", "password", "current_password"})


async def get_me(request: web.Request) -> web.Response:
    ident = await require_user(request)
    assert ident.user_id is not None
    async with connect(request) as conn:
        user = await users.get(conn, ident.user_id)
    if user is None:
        raise not_found("User")
    return json_response(user.public())


async def patch_me(request: web.Request) -> web.Response:
    ident = await require_user(request)
    assert ident.user_id is not None
    doc = await read_json_object(request)
    p = v.Problems()  # every problem of the body at once
    p.check(v.only, doc, PATCH_FIELDS, "on /me (ask an admin)")
    changes: dict[str, Any] = {}
    if "name" in doc:
        changes["name"] = p.check(v.name, doc["name"])
    passwords = request.app[PASSWORDS]
    new = p.check(v.password, doc["password"]) if "password" in doc else None
    current = doc.get("current_password")
    if "password" in doc and not isinstance(current, str):
        p.note(api_error(400, "invalid_request", "current_password: required to change the password.",
                         field="current_password"))
    p.raise_if_any()
    if new is not None and isinstance(current, str):
        async with connect(request) as conn:
            user = await users.get(conn, ident.user_id)
        if user is None or not await passwords.verify(user.password_hash, current):
            raise api_error(400, "invalid_request", "current_password: does not match.", field="current_password")
        changes["password_hash"] = await passwords.hash(new)
    async with connect(request, transaction=True) as conn:
        updated = await users.update(conn, ident.user_id, changes)
        if updated is None:
            raise not_found("User")
        if "password_hash" in changes:
            await sessions.revoke_user(conn, ident.user_id, "password changed")
        await audit.record(conn, ident.actor(request), "user.update_self", "user", ident.user_id,
                           {"fields": sorted(set(doc) - {"current_password"})})
    return json_response(updated.public())
