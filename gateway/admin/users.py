"""/admin/users: list, create, get, change, delete (admins only)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.admin import validation as v
from gateway.admin.common import connect, invalidate
from gateway.auth import sessions
from gateway.auth.guard import require_admin
from gateway.auth.handlers import PASSWORDS
from gateway.auth.responses import api_error, bad_request, json_response, not_found, read_json_object
from gateway.stores import audit, users

CREATE_FIELDS = frozenset({"email", "name", "password", "role", "disabled", "limits"})
PATCH_FIELDS = CREATE_FIELDS


async def list_users(request: web.Request) -> web.Response:
    await require_admin(request)
    limit, after = v.page(request)
    email = v.query_text(request, "email")
    role = v.query_choice(request, "role", v.ROLES)
    disabled = v.query_bool(request, "disabled")
    async with connect(request) as conn:
        rows = await users.list_page(conn, limit=limit, after=after, email=email.lower() if email else None,
                                     role=role, disabled=disabled)
    return json_response({"data": [u.public() for u in rows], "next_cursor": v.next_cursor(rows, limit)})


async def create_user(request: web.Request) -> web.Response:
    ident = await require_admin(request)
    doc = await read_json_object(request)
    p = v.Problems()  # every problem of the body at once
    p.check(v.only, doc, CREATE_FIELDS, "on a user")
    fields: dict[str, Any] = {"email": p.check(lambda: v.email(v.require(doc, "email")))}
    if "name" in doc:
        fields["name"] = p.check(v.name, doc["name"])
    if "role" in doc:
        fields["role"] = p.check(v.role, doc["role"])
    if "disabled" in doc:
        fields["disabled"] = p.check(v.boolean, doc["disabled"], "disabled")
    if "limits" in doc:
        fields["limits"] = p.check(v.limits, doc["limits"])
    new_password = p.check(v.password, doc["password"]) if doc.get("password") is not None else None
    p.raise_if_any()
    if new_password is not None:
        fields["password_hash"] = await request.app[PASSWORDS].hash(new_password)
    async with connect(request, transaction=True) as conn:
        try:
            user = await users.create(conn, **fields)
        except users.EmailTaken:
            raise api_error(409, "conflict", "A user with this email already exists.", field="email") from None
        await audit.record(conn, ident.actor(request), "user.create", "user", user.id,
                           {"fields": sorted(set(doc) - {"password"}), "password_set": "password" in doc})
    return json_response(user.public(), status=201)


async def get_user(request: web.Request) -> web.Response:
    await require_admin(request)
    user_id = v.object_id(request, "User")
    async with connect(request) as conn:
        user = await users.get(conn, user_id)
    if user is None:
        raise not_found("User")
    return json_response(user.public())


async def patch_user(request: web.Request) -> web.Response:
    ident = await require_admin(request)
    user_id = v.object_id(request, "User")
    doc = await read_json_object(request)
    p = v.Problems()  # every problem of the body at once
    p.check(v.only, doc, PATCH_FIELDS, "on a user")
    self_edit = ident.user_id == user_id
    changes: dict[str, Any] = {}
    if "email" in doc:
        changes["email"] = p.check(v.email, doc["email"])
    if "name" in doc:
        changes["name"] = p.check(v.name, doc["name"])
    if "role" in doc:
        changes["role"] = p.check(v.role, doc["role"])
        if self_edit and changes["role"] not in (None, "admin"):
            p.note(bad_request("role: you cannot remove your own admin role.", field="role"))
    if "disabled" in doc:
        changes["disabled"] = p.check(v.boolean, doc["disabled"], "disabled")
        if self_edit and changes["disabled"]:
            p.note(bad_request("disabled: you cannot disable yourself.", field="disabled"))
    if "limits" in doc:
        p.check(v.limits, doc["limits"])  # its shape now; merged onto the current limits below
    new_password = p.check(v.password, doc["password"]) if "password" in doc else None
    p.raise_if_any()
    if new_password is not None:
        changes["password_hash"] = await request.app[PASSWORDS].hash(new_password)
    async with connect(request, transaction=True) as conn:
        current = await users.get(conn, user_id)
        if current is None:
            raise not_found("User")
        if "limits" in doc:
            changes["limits"] = v.limits(doc["limits"], base=current.limits)
        try:
            user = await users.update(conn, user_id, changes)
        except users.EmailTaken:
            raise api_error(409, "conflict", "A user with this email already exists.", field="email") from None
        if user is None:
            raise not_found("User")
        if "password_hash" in changes or changes.get("disabled") or changes.get("role") == "user":
            await sessions.revoke_user(conn, user_id, "credentials or role changed")
        await audit.record(conn, ident.actor(request), "user.update", "user", user_id,
                           {"fields": sorted(doc)})
    invalidate(request, user_id=user_id)
    return json_response(user.public())


async def delete_user(request: web.Request) -> web.Response:
    ident = await require_admin(request)
    user_id = v.object_id(request, "User")
    if ident.user_id == user_id:
        raise bad_request("You cannot delete yourself.", field="id")
    async with connect(request, transaction=True) as conn:
        if not await users.soft_delete(conn, user_id):
            raise not_found("User")
        await audit.record(conn, ident.actor(request), "user.delete", "user", user_id)
    invalidate(request, user_id=user_id)
    return web.Response(status=204)
