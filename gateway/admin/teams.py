"""/admin/teams: teams, their members and their members' keys.

Who may do what (checked on every call, with the caller's role and team
re-read from Postgres):

- admins: everything, for every team (create, change limits, delete, add any user);
- a team's ``team_admin``: read its own team; list, create, change, disable and
  remove its members; list, create, revoke and rotate its members' keys; its
  team's usage.  Any other team, and every other admin route, is 403.

A user belongs to at most one team: adding a user who is in another team is 409.
"""

from __future__ import annotations

import math
import re
import uuid
from typing import Any

import asyncpg
from aiohttp import web

from gateway.admin import validation as v
from gateway.admin.common import connect, invalidate
from gateway.admin.key_rotation import rotate_key
from gateway.auth.guard import Identity, identify, require_admin
from gateway.auth.handlers import PASSWORDS
from gateway.auth.responses import api_error, bad_request, json_response, not_found, read_json_object
from gateway.stores import access_keys, audit, teams, users

TEAM_FIELDS = frozenset({"name", "limits", "model_budgets"})
MAX_MODEL_BUDGETS = 20
_MODEL_GLOB = re.compile(r"^[A-Za-z0-9_.:/@+*?-]{1,100}$")
MEMBER_CREATE = frozenset({"email", "name", "password", "limits", "disabled"})
MEMBER_ADD = frozenset({"user_id", "role"})
MEMBER_PATCH = frozenset({"name", "limits", "disabled", "role"})
KEY_CREATE = frozenset({"user_id", "name", "limits", "expires_at"})
TEAM_ROLES = ("user", "team_admin")


async def team_access(request: web.Request) -> tuple[Identity, str]:
    """(caller, team id): an admin, or the team admin of exactly this team; else 403 (or 404)."""
    ident = await identify(request)
    team_id = v.object_id(request, "Team")
    if ident.is_admin:
        return ident, team_id
    if ident.role == "team_admin" and ident.user_id is not None:
        async with connect(request) as conn:
            if await teams.team_of(conn, ident.user_id) == team_id:
                return ident, team_id
    raise api_error(403, "forbidden", "This endpoint needs the admin role or the team admin role of this team.")


# ---------------------------------------------------------------- teams


async def list_teams(request: web.Request) -> web.Response:
    await require_admin(request)
    limit, after = v.page(request)
    async with connect(request) as conn:
        rows = await teams.list_page(conn, limit=limit, after=after)
    return json_response({"data": [t.public() for t in rows], "next_cursor": v.next_cursor(rows, limit)})


async def create_team(request: web.Request) -> web.Response:
    ident = await require_admin(request)
    doc = await read_json_object(request)
    v.only(doc, TEAM_FIELDS, "on a team")
    name = v.name(v.require(doc, "name"))
    if not name:
        raise bad_request("name: must not be empty.", field="name")
    limits = v.limits(doc["limits"]) if doc.get("limits") is not None else v.limits({})
    budgets = model_budgets(doc["model_budgets"]) if doc.get("model_budgets") is not None else ()
    async with connect(request, transaction=True) as conn:
        try:
            team = await teams.create(conn, name=name, limits=limits, model_budgets=budgets)
        except teams.TeamNameTaken:
            raise api_error(409, "conflict", "A team with this name already exists.", field="name") from None
        await audit.record(conn, ident.actor(request), "team.create", "team", team.id, {"fields": sorted(doc)})
    return json_response(team.public(members=0), status=201)


async def get_team(request: web.Request) -> web.Response:
    _, team_id = await team_access(request)
    async with connect(request) as conn:
        team = await teams.get(conn, team_id)
        if team is None:
            raise not_found("Team")
        n = await teams.member_count(conn, team_id)
    return json_response(team.public(members=n))


async def patch_team(request: web.Request) -> web.Response:
    ident = await require_admin(request)
    team_id = v.object_id(request, "Team")
    doc = await read_json_object(request)
    v.only(doc, TEAM_FIELDS, "on a team")
    async with connect(request, transaction=True) as conn:
        current = await teams.get(conn, team_id)
        if current is None:
            raise not_found("Team")
        name = v.name(doc["name"]) if "name" in doc else None
        limits = v.limits(doc["limits"], base=current.limits) if "limits" in doc else None
        budgets = model_budgets(doc["model_budgets"] or {}) if "model_budgets" in doc else None
        try:
            team = await teams.update(conn, team_id, name=name or None, limits=limits, model_budgets=budgets)
        except teams.TeamNameTaken:
            raise api_error(409, "conflict", "A team with this name already exists.", field="name") from None
        if team is None:
            raise not_found("Team")
        await audit.record(conn, ident.actor(request), "team.update", "team", team_id, {"fields": sorted(doc)})
        members = await teams.member_ids(conn, team_id)
    for uid in members:
        invalidate(request, user_id=uid)
    return json_response(team.public(members=len(members)))


async def delete_team(request: web.Request) -> web.Response:
    ident = await require_admin(request)
    team_id = v.object_id(request, "Team")
    async with connect(request, transaction=True) as conn:
        members = await teams.member_ids(conn, team_id)
        if not await teams.delete(conn, team_id):
            raise not_found("Team")
        await audit.record(conn, ident.actor(request), "team.delete", "team", team_id, {"members": len(members)})
    for uid in members:
        invalidate(request, user_id=uid)
    return web.Response(status=204)


# ---------------------------------------------------------------- members


def _member(u: users.User, team_id: str) -> dict[str, Any]:
    return {**u.public(), "team_id": team_id}


async def list_members(request: web.Request) -> web.Response:
    _, team_id = await team_access(request)
    async with connect(request) as conn:
        if await teams.get(conn, team_id) is None:
            raise not_found("Team")
        rows = await teams.members(conn, team_id)
    return json_response({"data": [_member(u, team_id) for u in rows]})


async def add_member(request: web.Request) -> web.Response:
    """``{"user_id", "role"?}`` (admins: an existing user) or ``{"email", ...}`` (a new user in the team)."""
    ident, team_id = await team_access(request)
    doc = await read_json_object(request)
    if "user_id" in doc:
        if not ident.is_admin:
            raise api_error(403, "forbidden", "Only admins may move existing users into a team.")
        v.only(doc, MEMBER_ADD, "when adding a user to a team")
        user_id = _uuid(doc["user_id"], "user_id")
        role = _team_role(doc.get("role", "user"))
        async with connect(request, transaction=True) as conn:
            if await teams.get(conn, team_id) is None:
                raise not_found("Team")
            user = await users.get(conn, user_id)
            if user is None:
                raise bad_request("user_id: no such user.", field="user_id")
            if user.role == "admin":
                raise bad_request("user_id: admins are not team members.", field="user_id")
            if not await teams.join(conn, team_id, user_id, role):
                raise api_error(409, "conflict", "This user is already in another team.", field="user_id")
            await audit.record(conn, ident.actor(request), "team.member_add", "team", team_id,
                               {"user_id": user_id, "role": role})
            user = await users.get(conn, user_id)
        invalidate(request, user_id=user_id)
        assert user is not None
        return json_response(_member(user, team_id), status=201)
    v.only(doc, MEMBER_CREATE, "on a team member")
    fields: dict[str, Any] = {"email": v.email(v.require(doc, "email"))}
    if "name" in doc:
        fields["name"] = v.name(doc["name"])
    if "disabled" in doc:
        fields["disabled"] = v.boolean(doc["disabled"], "disabled")
    if "limits" in doc:
        fields["limits"] = v.limits(doc["limits"])
    if doc.get("password") is not None:
        fields["password_hash"] = await request.app[PASSWORDS].hash(v.password(doc["password"]))
    async with connect(request, transaction=True) as conn:
        if await teams.get(conn, team_id) is None:
            raise not_found("Team")
        try:
            user = await users.create(conn, **fields)
        except users.EmailTaken:
            raise api_error(409, "conflict", "A user with this email already exists.", field="email") from None
        await teams.join(conn, team_id, user.id)
        await audit.record(conn, ident.actor(request), "team.member_create", "team", team_id,
                           {"user_id": user.id, "fields": sorted(set(doc) - {"password"})})
    return json_response(_member(user, team_id), status=201)


async def _own_member(conn: asyncpg.Connection, team_id: str, user_id: str) -> users.User:
    if await teams.team_of(conn, user_id) != team_id:
        raise not_found("Team member")
    user = await users.get(conn, user_id)
    if user is None:
        raise not_found("Team member")
    return user


async def patch_member(request: web.Request) -> web.Response:
    ident, team_id = await team_access(request)
    user_id = v.object_id(request, "Team member", "user_id")
    doc = await read_json_object(request)
    v.only(doc, MEMBER_PATCH, "on a team member")
    changes: dict[str, Any] = {}
    if "name" in doc:
        changes["name"] = v.name(doc["name"])
    if "disabled" in doc:
        if user_id == ident.user_id and doc["disabled"]:
            raise bad_request("disabled: you cannot disable yourself.", field="disabled")
        changes["disabled"] = v.boolean(doc["disabled"], "disabled")
    if "role" in doc:
        if not ident.is_admin:
            raise api_error(403, "forbidden", "Only admins may change a member's role.")
        changes["role"] = _team_role(doc["role"])
    async with connect(request, transaction=True) as conn:
        current = await _own_member(conn, team_id, user_id)
        if "limits" in doc:
            changes["limits"] = v.limits(doc["limits"], base=current.limits)
        user = await users.update(conn, user_id, changes)
        if user is None:
            raise not_found("Team member")
        await audit.record(conn, ident.actor(request), "team.member_update", "user", user_id,
                           {"team_id": team_id, "fields": sorted(doc)})
    invalidate(request, user_id=user_id)
    return json_response(_member(user, team_id))


async def remove_member(request: web.Request) -> web.Response:
    ident, team_id = await team_access(request)
    user_id = v.object_id(request, "Team member", "user_id")
    if user_id == ident.user_id:
        raise bad_request("You cannot remove yourself from your team.")
    async with connect(request, transaction=True) as conn:
        if not await teams.leave(conn, team_id, user_id):
            raise not_found("Team member")
        await audit.record(conn, ident.actor(request), "team.member_remove", "team", team_id, {"user_id": user_id})
    invalidate(request, user_id=user_id)
    return web.Response(status=204)


# ---------------------------------------------------------------- members' keys


async def list_keys(request: web.Request) -> web.Response:
    _, team_id = await team_access(request)
    async with connect(request) as conn:
        ids = await teams.member_ids(conn, team_id)
        rows = await conn.fetch(
            f"SELECT {access_keys._COLUMNS} FROM access_keys WHERE user_id = ANY($1::uuid[]) "  # noqa: S608 - constant SQL
            "ORDER BY created_at, id", ids,
        )
    return json_response({"data": [access_keys._key(r).public() for r in rows]})


async def create_key(request: web.Request) -> web.Response:
    ident, team_id = await team_access(request)
    doc = await read_json_object(request)
    v.only(doc, KEY_CREATE, "on a team key")
    user_id = _uuid(v.require(doc, "user_id"), "user_id")
    name = v.name(doc.get("name", ""))
    limits = v.limits(doc["limits"]) if doc.get("limits") is not None else None
    expires = v.expires_at(doc.get("expires_at"))
    async with connect(request, transaction=True) as conn:
        if await teams.team_of(conn, user_id) != team_id:
            raise bad_request("user_id: not a member of this team.", field="user_id")
        key, plaintext = await access_keys.create(conn, user_id=user_id, name=name, limits=limits,
                                                  expires_at=expires, created_by=ident.user_id)
        await audit.record(conn, ident.actor(request), "key.create", "key", key.id,
                           {"user_id": user_id, "team_id": team_id, "prefix": key.prefix})
    return json_response({**key.public(), "key": plaintext}, status=201)


async def _team_key(request: web.Request, team_id: str) -> tuple[str, list[str]]:
    key_id = v.object_id(request, "Key", "key_id")
    async with connect(request) as conn:
        return key_id, await teams.member_ids(conn, team_id)


async def revoke_key(request: web.Request) -> web.Response:
    ident, team_id = await team_access(request)
    key_id = v.object_id(request, "Key", "key_id")
    async with connect(request, transaction=True) as conn:
        key = await access_keys.get(conn, key_id)
        if key is None or await teams.team_of(conn, key.user_id) != team_id:
            raise not_found("Key")
        await access_keys.revoke(conn, key_id)
        await audit.record(conn, ident.actor(request), "key.revoke", "key", key_id, {"team_id": team_id})
    invalidate(request, key_id=key_id)
    return web.Response(status=204)


async def rotate_team_key(request: web.Request) -> web.Response:
    _, team_id = await team_access(request)
    key_id, members = await _team_key(request, team_id)
    return await rotate_key(request, owners=members, key_id=key_id)


# ---------------------------------------------------------------- helpers


def _uuid(value: Any, field: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise bad_request(f"{field}: must be a user's id.", field=field) from None


def model_budgets(doc: Any) -> tuple[tuple[str, float, str], ...]:
    """``{"gpt-4o*": {"budget_usd": 100, "budget_period": "month"}}`` (replaces the whole set)."""
    f = "model_budgets"
    if not isinstance(doc, dict) or len(doc) > MAX_MODEL_BUDGETS:
        raise bad_request(f"{f}: an object of at most {MAX_MODEL_BUDGETS} model names or globs.", field=f)
    out = []
    for glob, b in doc.items():
        if not _MODEL_GLOB.match(glob):
            raise bad_request(f"{f}: {glob[:40]!r} is not a model name or glob (* and ? only).", field=f)
        if not isinstance(b, dict) or set(b) - {"budget_usd", "budget_period"}:
            raise bad_request(f"{f}.{glob}: must be {{\"budget_usd\": N, \"budget_period\": ...}}.", field=f)
        usd = b.get("budget_usd")
        if isinstance(usd, bool) or not isinstance(usd, int | float) or not math.isfinite(usd) or usd < 0:
            raise bad_request(f"{f}.{glob}.budget_usd: must be a number >= 0.", field=f)
        period = b.get("budget_period", "total")
        if period not in ("day", "month", "total"):
            raise bad_request(f"{f}.{glob}.budget_period: must be 'day', 'month' or 'total'.", field=f)
        out.append((glob, float(usd), str(period)))
    return tuple(sorted(out))


def _team_role(value: Any) -> str:
    if value not in TEAM_ROLES:
        raise bad_request("role: must be 'user' or 'team_admin'.", field="role")
    return str(value)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/teams", list_teams)
    r.add_post("/admin/teams", create_team)
    r.add_get("/admin/teams/{id}", get_team)
    r.add_patch("/admin/teams/{id}", patch_team)
    r.add_delete("/admin/teams/{id}", delete_team)
    r.add_get("/admin/teams/{id}/users", list_members)
    r.add_post("/admin/teams/{id}/users", add_member)
    r.add_patch("/admin/teams/{id}/users/{user_id}", patch_member)
    r.add_delete("/admin/teams/{id}/users/{user_id}", remove_member)
    r.add_get("/admin/teams/{id}/keys", list_keys)
    r.add_post("/admin/teams/{id}/keys", create_key)
    r.add_delete("/admin/teams/{id}/keys/{key_id}", revoke_key)
    r.add_post("/admin/teams/{id}/keys/{key_id}/rotate", rotate_team_key)
