"""The control plane reports every problem of a body at once, not only the first."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.control_plane import ADMIN, bearer, create_key, create_user, login


def _fields(doc: dict[str, Any]) -> set[str]:
    err = doc["error"]
    return {e.get("field") for e in err.get("errors", [err])}


async def test_creating_a_user_lists_every_bad_field(cp):
    r = await cp.post("/admin/users", headers=ADMIN, json={
        "email": "not-an-email", "role": "owner", "password": "short", "name": 7,
        "limits": {"rpm": -1, "budget_period": "week", "models": "claude-*", "color": "red"},
        "spend": 0,
    })
    assert 400 == r.status
    doc = await r.json()
    assert {"email", "role", "password", "name", "limits.rpm", "limits.budget_period", "limits.models",
            "color", "spend"} == _fields(doc)
    err = doc["error"]
    assert err["field"] == err["errors"][0]["field"]  # the first problem stays at the top, as before
    assert err["message"].startswith(f"{len(err['errors'])} problems:")
    assert all({"code", "message", "field"} <= set(e) for e in err["errors"])
    assert 0 == len((await (await cp.get("/admin/users", headers=ADMIN, params={"email": "not-an"})).json())["data"])


async def test_one_problem_keeps_the_single_error_shape(cp):
    r = await cp.post("/admin/users", headers=ADMIN, json={"email": "x@example.com", "role": "owner"})
    assert 400 == r.status
    err = (await r.json())["error"]
    assert ("role", "invalid_request") == (err["field"], err["code"])
    assert "errors" not in err


@pytest.mark.parametrize("path", ["/admin/keys", "/me/keys"])
async def test_creating_and_patching_a_key_lists_every_bad_field(cp, path):
    user = await create_user(cp, "keys@example.com", limits={"rpm": 10, "tpm": 100})
    headers = ADMIN if path.startswith("/admin") else bearer((await login(cp, "keys@example.com"))["access_token"])
    body: dict[str, Any] = {"name": "\x01", "expires_at": "2001-01-01T00:00:00Z",
                            "limits": {"tpm": 0, "allowed_ips": ["not-a-net"]}, "role": "admin"}
    if path.startswith("/admin"):
        body["user_id"] = "nobody"
    r = await cp.post(path, headers=headers, json=body)
    assert 400 == r.status
    want = {"name", "expires_at", "limits.tpm", "limits.allowed_ips", "role"}
    assert want | ({"user_id"} if path.startswith("/admin") else set()) == _fields(await r.json())

    key = await create_key(cp, user["id"])
    r = await cp.patch(f"{path}/{key['id']}", headers=headers, json={
        "name": 5, "expires_at": "yesterday", "limits": {"max_tokens": "many", "budget_usd": -1}})
    assert 400 == r.status
    assert {"name", "expires_at", "limits.max_tokens", "limits.budget_usd"} == _fields(await r.json())
    if path == "/me/keys":  # looser than the user's own limits: every such field
        r = await cp.post(path, headers=headers, json={"limits": {"rpm": 99, "tpm": 1000}})
        assert 400 == r.status and {"limits.rpm", "limits.tpm"} == _fields(await r.json())


async def test_patching_me_lists_every_bad_field(cp):
    await create_user(cp, "me@example.com")
    token = (await login(cp, "me@example.com"))["access_token"]
    r = await cp.patch("/me", headers=bearer(token), json={"name": 1, "password": "x", "role": "admin"})
    assert 400 == r.status
    assert {"name", "password", "current_password", "role"} == _fields(await r.json())
