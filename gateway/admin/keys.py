"""/admin/keys (any user's keys, admins only) and /me/keys (one's own keys).

Both share the handlers below; ``_scope`` decides whose keys a caller sees.
Someone else's key answers 404 on /me/keys, exactly like a missing one.
The plaintext key is in the creation answer only.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from gateway import keys as appkeys
from gateway.admin import validation as v
from gateway.admin.common import connect, invalidate
from gateway.auth.guard import Identity, require_admin, require_user
from gateway.auth.responses import api_error, json_response, not_found, read_json_object
from gateway.stores import access_keys, audit, users

ADMIN_CREATE = frozenset({"user_id", "name", "limits", "expires_at"})
OWN_CREATE = frozenset({"name", "limits", "expires_at"})
PATCH_FIELDS = frozenset({"name", "limits", "expires_at"})
STATUSES = ("active", "revoked", "expired")


async def _scope(request: web.Request, own: bool) -> tuple[Identity, str | None]:
    """(caller, owner filter): an admin on /admin/keys sees every key."""
    if own:
        ident = await require_user(request)
        return ident, ident.user_id
    return await require_admin(request), None


async def _list(request: web.Request, own: bool) -> web.Response:
    _, owner = await _scope(request, own)
    limit, after = v.page(request)
    user_filter = owner if own else v.optional_uuid(request, "user_id")
    status = v.query_choice(request, "status", STATUSES)
    name = v.query_text(request, "name")
    async with connect(request) as conn:
        rows = await access_keys.list_page(conn, limit=limit, after=after, user_id=user_filter, status=status,
                                           name=name)
    return json_response({"data": [k.public() for k in rows], "next_cursor": v.next_cursor(rows, limit)})


def _user_id(doc: dict[str, Any]) -> str:
    raw = v.require(doc, "user_id")
    try:
        return str(uuid.UUID(str(raw)))
    except ValueError:
        raise api_error(400, "invalid_request", "user_id: must be a user's id.", field="user_id") from None


async def _create(request: web.Request, own: bool) -> web.Response:
    ident, owner = await _scope(request, own)
    doc = await read_json_object(request)
    p = v.Problems()  # every problem of the body at once
    p.check(v.only, doc, OWN_CREATE if own else ADMIN_CREATE, "on a key")
    if own:
        assert owner is not None
        user_id = owner
    else:
        user_id = p.check(_user_id, doc) or ""
    name = p.check(v.name, doc.get("name", ""))
    limits = p.check(v.limits, doc["limits"]) if doc.get("limits") is not None else None
    expires = p.check(v.expires_at, doc.get("expires_at"))
    p.raise_if_any()
    assert name is not None
    cap = request.app[appkeys.CONFIG].auth.max_keys_per_user
    async with connect(request, transaction=True) as conn:
        user = await users.get(conn, user_id)
        if user is None:
            if own:
                raise not_found("User")
            raise api_error(400, "invalid_request", "user_id: no such user.", field="user_id")
        if own:
            if user.disabled:
                raise api_error(403, "forbidden", "Your account is disabled.")
            if limits is not None:
                v.within(limits, user.limits)
            # Serialise concurrent creations by one user so that the cap holds.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", user_id)
            if await access_keys.count_active(conn, user_id) >= cap:
                raise api_error(409, "too_many_keys", f"You may hold at most {cap} active keys; revoke one first.")
        key, plaintext = await access_keys.create(conn, user_id=user_id, name=name, limits=limits,
                                                  expires_at=expires, created_by=ident.user_id)
        await audit.record(conn, ident.actor(request), "key.create", "key", key.id,
                           {"user_id": user_id, "prefix": key.prefix, "fields": sorted(doc)})
    return json_response({**key.public(), "key": plaintext}, status=201)


async def _get(request: web.Request, own: bool) -> web.Response:
    _, owner = await _scope(request, own)
    key_id = v.object_id(request, "Key")
    async with connect(request) as conn:
        key = await access_keys.get(conn, key_id, user_id=owner)
    if key is None:
        raise not_found("Key")
    return json_response(key.public())


async def _patch(request: web.Request, own: bool) -> web.Response:
    ident, owner = await _scope(request, own)
    key_id = v.object_id(request, "Key")
    doc = await read_json_object(request)
    p = v.Problems()  # every problem of the body at once
    p.check(v.only, doc, PATCH_FIELDS, "on a key")
    changes: dict[str, Any] = {}
    if "name" in doc:
        changes["name"] = p.check(v.name, doc["name"])
    if "expires_at" in doc:
        changes["expires_at"] = p.check(v.expires_at, doc["expires_at"])
    if "limits" in doc:
        p.check(v.limits, doc["limits"])  # its shape now; merged onto the key's current limits below
    p.raise_if_any()
    async with connect(request, transaction=True) as conn:
        current = await access_keys.get(conn, key_id, user_id=owner)
        if current is None:
            raise not_found("Key")
        if current.revoked_at is not None:
            raise api_error(409, "key_revoked", "This key is revoked; create a new one.")
        if "limits" in doc:
            changes["limits"] = v.limits(doc["limits"], base=current.limits)
            if own:
                user = await users.get(conn, current.user_id)
                if user is not None:
                    v.within(changes["limits"], user.limits)
        key = await access_keys.update(conn, key_id, changes, user_id=owner)
        if key is None:
            raise not_found("Key")
        await audit.record(conn, ident.actor(request), "key.update", "key", key_id, {"fields": sorted(doc)})
    invalidate(request, key_id=key_id)
    return json_response(key.public())


async def _revoke(request: web.Request, own: bool) -> web.Response:
    ident, owner = await _scope(request, own)
    key_id = v.object_id(request, "Key")
    async with connect(request, transaction=True) as conn:
        key = await access_keys.revoke(conn, key_id, user_id=owner)
        if key is None:
            raise not_found("Key")
        await audit.record(conn, ident.actor(request), "key.revoke", "key", key_id, {"prefix": key.prefix})
    invalidate(request, key_id=key_id)
    return web.Response(status=204)


async def admin_list(request: web.Request) -> web.Response:
    return await _list(request, own=False)


async def admin_create(request: web.Request) -> web.Response:
    return await _create(request, own=False)


async def admin_get(request: web.Request) -> web.Response:
    return await _get(request, own=False)


async def admin_patch(request: web.Request) -> web.Response:
    return await _patch(request, own=False)


async def admin_revoke(request: web.Request) -> web.Response:
    return await _revoke(request, own=False)


async def own_list(request: web.Request) -> web.Response:
    return await _list(request, own=True)


async def own_create(request: web.Request) -> web.Response:
    return await _create(request, own=True)


async def own_get(request: web.Request) -> web.Response:
    return await _get(request, own=True)


async def own_patch(request: web.Request) -> web.Response:
    return await _patch(request, own=True)


async def own_revoke(request: web.Request) -> web.Response:
    return await _revoke(request, own=True)
