"""GET/PUT /admin/keys/{id}/tags and /me/keys/{id}/tags: a key's default cost-attribution tags.

PUT replaces the whole set: ``{"tags": {"project": "search", "env": "prod"}}``
(validated like request tags: names from the allow-list, safe values, <= 10).
"""

from __future__ import annotations

from aiohttp import web

from gateway import keys as appkeys
from gateway.accounting.tags import TagError
from gateway.admin import validation as v
from gateway.admin.common import connect, invalidate
from gateway.auth.guard import identify, require_admin, require_user
from gateway.auth.responses import bad_request, json_response, not_found, read_json_object
from gateway.stores import audit, key_tags


async def get_tags(request: web.Request, *, owner: str | None = None,
                   owners: list[str] | None = None) -> web.Response:
    key_id = v.object_id(request, "Key")
    async with connect(request) as conn:
        tags = await key_tags.get(conn, key_id, user_id=owner, user_ids=owners)
    if tags is None:
        raise not_found("Key")
    return json_response({"id": key_id, "tags": tags})


async def put_tags(request: web.Request, *, owner: str | None = None,
                   owners: list[str] | None = None) -> web.Response:
    ident = await identify(request)
    key_id = v.object_id(request, "Key")
    doc = await read_json_object(request)
    v.only(doc, {"tags"}, "on key tags")
    try:
        tags = request.app[appkeys.TAGS].rules.mapping(v.require(doc, "tags"), "tags")
    except TagError as exc:
        raise bad_request(str(exc), field="tags") from None
    async with connect(request, transaction=True) as conn:
        stored = await key_tags.put(conn, key_id, tags, user_id=owner, user_ids=owners)
        if stored is None:
            raise not_found("Key")
        await audit.record(conn, ident.actor(request), "key.tags", "key", key_id, {"tags": sorted(tags)})
    invalidate(request, key_id=key_id)
    return json_response({"id": key_id, "tags": stored})


async def admin_get(request: web.Request) -> web.Response:
    await require_admin(request)
    return await get_tags(request)


async def admin_put(request: web.Request) -> web.Response:
    await require_admin(request)
    return await put_tags(request)


async def own_get(request: web.Request) -> web.Response:
    ident = await require_user(request)
    return await get_tags(request, owner=ident.user_id)


async def own_put(request: web.Request) -> web.Response:
    ident = await require_user(request)
    return await put_tags(request, owner=ident.user_id)
