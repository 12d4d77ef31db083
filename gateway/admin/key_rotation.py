"""POST /admin/keys/{id}/rotate and /me/keys/{id}/rotate: a new secret, the old one on a grace period.

Body (optional): ``{"grace_seconds": N}``, 0 .. 30 days, default 24 h.  The
answer is the key (same id, limits, counters and budget history) with the
new plaintext ``key`` (shown once) and ``previous_valid_until``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web

from gateway.admin import validation as v
from gateway.admin.common import connect, invalidate
from gateway.auth.guard import identify, require_admin, require_user
from gateway.auth.responses import bad_request, json_response, not_found, read_json_object
from gateway.stores import audit, key_rotation


def grace_seconds(doc: dict[str, Any]) -> int:
    raw = doc.get("grace_seconds", key_rotation.DEFAULT_GRACE_SECONDS)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= key_rotation.MAX_GRACE_SECONDS:
        raise bad_request(f"grace_seconds: must be an integer from 0 to {key_rotation.MAX_GRACE_SECONDS}.",
                          field="grace_seconds")
    return raw


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    doc = await read_json_object(request)
    v.only(doc, {"grace_seconds"}, "on a rotation")
    return doc


async def rotate_key(request: web.Request, *, owner: str | None = None, owners: list[str] | None = None,
                     key_id: str | None = None) -> web.Response:
    """Shared by the admin, own-key and team-admin routes (the caller checked the role)."""
    ident = await identify(request)
    key_id = key_id or v.object_id(request, "Key")
    grace = grace_seconds(await _body(request))
    async with connect(request, transaction=True) as conn:
        rotation = await key_rotation.rotate(conn, key_id, timedelta(seconds=grace), user_id=owner, user_ids=owners)
        if rotation is None:
            raise not_found("Key")
        await audit.record(conn, ident.actor(request), "key.rotate", "key", key_id,
                           {"prefix": rotation.key.prefix, "previous_prefix": rotation.previous_prefix,
                            "grace_seconds": grace})
    invalidate(request, key_id=key_id)
    return json_response({**rotation.key.public(), "key": rotation.plaintext,
                          "previous_prefix": rotation.previous_prefix,
                          "previous_valid_until": rotation.previous_valid_until}, status=201)


async def admin_rotate(request: web.Request) -> web.Response:
    await require_admin(request)
    return await rotate_key(request)


async def own_rotate(request: web.Request) -> web.Response:
    ident = await require_user(request)
    return await rotate_key(request, owner=ident.user_id)
