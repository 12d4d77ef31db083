"""Control-plane input Postgres cannot store is refused with 400, never a 500.

A NUL (``%00`` in a query string, ``\\u0000`` in a JSON string) or another
control character in a query: table over every control-plane entry point.
"""

from __future__ import annotations

import pytest

from tests.fixtures.control_plane import ADMIN, create_user

QUERIES = [
    "/admin/usage?user_id=%00", "/admin/usage?key_id=%00", "/admin/usage?model=a%00b",
    "/admin/usage?group_by=model&model=%00", "/admin/users?email=%00", "/admin/keys?cursor=%00",
    "/admin/audit?before=%00", "/me/usage?model=%00", "/admin/usage?model=%1F", "/admin/users?limit=%7F",
]


@pytest.mark.parametrize("path", QUERIES)
async def test_control_characters_in_control_plane_queries_are_400(cp, path):
    """A decoded query value with NUL or a control character: 400 in the control plane's shape."""
    r = await cp.get(path, headers=ADMIN)
    assert 400 == r.status, await r.text()
    assert "invalid_request" == (await r.json())["error"]["code"]
    assert "%00" not in r.headers.get("x-request-id", "")


BODIES = [
    ("POST", "/admin/users", {"email": "a\u0000@example.com", "password": "x" * 12}),
    ("POST", "/admin/users", {"email": "b@example.com", "password": "x" * 12, "name": "a\u0000b"}),
    ("POST", "/admin/keys", {"user_id": "{uid}", "name": "n\u0000"}),
    ("POST", "/admin/keys", {"user_id": "{uid}", "limits": {"models": ["a\u0000"]}}),
    ("PATCH", "/admin/users/{uid}", {"name": "z\u0000"}),
    ("POST", "/auth/login", {"email": "x\u0000@e.com", "password": "p\u0000" * 8}),
    ("POST", "/auth/refresh", {"refresh_token": "gwr_\u0000"}),
    ("POST", "/auth/logout", {"refresh_token": "gwr_\u0000"}),
    ("POST", "/admin/users", {"email\u0000": "c@example.com"}),
]


@pytest.mark.parametrize(("method", "path", "body"), BODIES)
async def test_nul_in_control_plane_json_is_400(cp, method, path, body):
    """\\u0000 anywhere in a control-plane JSON body (values, keys, nested): 400, nothing stored."""
    user = await create_user(cp, "owner@example.com")
    doc = {k: (v.replace("{uid}", user["id"]) if isinstance(v, str) else v) for k, v in body.items()}
    r = await cp.request(method, path.replace("{uid}", user["id"]), headers=ADMIN, json=doc)
    assert 400 == r.status, await r.text()
    assert "invalid_request" == (await r.json())["error"]["code"]


async def test_escaped_backslash_u0000_text_is_not_a_nul(cp):
    """The six characters \\u0000 as text (an escaped backslash) are ordinary text."""
    r = await cp.post("/admin/users", headers=ADMIN,
                      json={"email": "lit@example.com", "password": "x" * 12, "name": "literally \\u0000"})
    assert 201 == r.status, await r.text()
    assert "literally \\u0000" == (await r.json())["name"]
