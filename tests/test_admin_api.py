"""Admin and /me API: the role and ownership matrix, mass assignment, validation, pagination, audit."""

from __future__ import annotations

from tests.fixtures.control_plane import ADMIN, bearer, call_model, create_key, create_user, login, pg_toml

NIL = "00000000-0000-0000-0000-000000000000"


async def _setup(cp):
    """Two users with a key each, and an admin user; returns (alice, alice_token, bob, bob_key, admin_token)."""
    alice = await create_user(cp, "alice@example.com")
    bob = await create_user(cp, "bob@example.com")
    await create_user(cp, "root@example.com", role="admin")
    alice_token = (await login(cp, "alice@example.com"))["access_token"]
    admin_token = (await login(cp, "root@example.com"))["access_token"]
    bob_key = await create_key(cp, bob["id"], name="bob's")
    return alice, alice_token, bob, bob_key, admin_token


def _admin_routes(user_id: str, key_id: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("GET", "/admin/users", None),
        ("POST", "/admin/users", {"email": "new@example.com"}),
        ("GET", f"/admin/users/{user_id}", None),
        ("PATCH", f"/admin/users/{user_id}", {"name": "x"}),
        ("GET", "/admin/keys", None),
        ("POST", "/admin/keys", {"user_id": user_id}),
        ("GET", f"/admin/keys/{key_id}", None),
        ("PATCH", f"/admin/keys/{key_id}", {"name": "x"}),
        ("GET", "/admin/audit", None),
        ("DELETE", f"/admin/keys/{key_id}", None),
        ("DELETE", f"/admin/users/{user_id}", None),
    ]


async def test_a_user_token_gets_403_on_every_admin_route_and_no_token_gets_401(cp):
    """Role check on every admin route: users are forbidden, anonymous callers unauthenticated."""
    _, alice_token, bob, bob_key, _ = await _setup(cp)
    for method, path, body in _admin_routes(bob["id"], bob_key["id"]):
        r = await cp.request(method, path, headers=bearer(alice_token), json=body)
        assert 403 == r.status, (method, path)
        assert "forbidden" == (await r.json())["error"]["code"]
        r = await cp.request(method, path, json=body)
        assert 401 == r.status, (method, path)
    for method, path in (("GET", "/me"), ("PATCH", "/me"), ("GET", "/me/keys"), ("POST", "/me/keys"),
                         ("GET", f"/me/keys/{NIL}"), ("PATCH", f"/me/keys/{NIL}"), ("DELETE", f"/me/keys/{NIL}")):
        r = await cp.request(method, path, json={})
        assert 401 == r.status, (method, path)
        r = await cp.request(method, path, json={}, headers=ADMIN)  # the bootstrap token has no user account
        assert 403 == r.status, (method, path)
    # Nothing changed for bob.
    r = await cp.get(f"/admin/keys/{bob_key['id']}", headers=ADMIN)
    assert "active" == (await r.json())["status"]
    assert 200 == await call_model(cp, bob_key["key"])


async def test_an_admin_user_and_the_bootstrap_token_can_use_every_admin_route(cp):
    """Admins (JWT or bootstrap token) get 2xx on every admin route."""
    _, _, bob, bob_key, admin_token = await _setup(cp)
    for headers in (bearer(admin_token), ADMIN):
        victim = await create_user(cp, f"v{len(headers['authorization'])}@example.com")
        key = await create_key(cp, victim["id"])
        for method, path, body in _admin_routes(victim["id"], key["id"]):
            if path == "/admin/users" and method == "POST":
                body = {"email": f"n{len(headers['authorization'])}@example.com"}
            r = await cp.request(method, path, headers=headers, json=body)
            assert r.status in (200, 201, 204), (method, path, r.status, await r.text())


async def test_users_never_see_or_touch_another_users_keys(cp):
    """Ownership: bob's key is 404 on alice's /me/keys (read, change, revoke) and absent from her list."""
    _, alice_token, _, bob_key, _ = await _setup(cp)
    h = bearer(alice_token)
    for method, body in (("GET", None), ("PATCH", {"name": "mine now"}), ("DELETE", None)):
        r = await cp.request(method, f"/me/keys/{bob_key['id']}", headers=h, json=body)
        assert 404 == r.status, method
    r = await cp.get("/me/keys", headers=h)
    assert [] == (await r.json())["data"]
    assert 200 == await call_model(cp, bob_key["key"])


async def test_users_manage_their_own_keys_within_their_own_limits(make_gateway, mock_upstream, pg_env):
    """/me/keys: create and revoke one's own keys; never looser than one's limits or above the key cap."""
    cp = await make_gateway(pg_toml(mock_upstream.base_url, extra="""
        [auth]
        max_keys_per_user = 2
        """))
    await create_user(cp, "una@example.com", limits={"rpm": 10, "models": ["demo-*"]})
    h = bearer((await login(cp, "una@example.com"))["access_token"])
    r = await cp.post("/me/keys", headers=h, json={"name": "too fast", "limits": {"rpm": 20}})
    assert 400 == r.status
    assert "limits.rpm" == (await r.json())["error"]["field"]
    r = await cp.post("/me/keys", headers=h, json={"limits": {"models": ["gpt-*"]}})
    assert 400 == r.status
    r = await cp.post("/me/keys", headers=h, json={"name": "ok", "limits": {"rpm": 5, "models": ["demo-claude*"]}})
    assert 201 == r.status
    key = await r.json()
    assert 200 == await call_model(cp, key["key"])
    assert 201 == (await cp.post("/me/keys", headers=h, json={"name": "second"})).status
    r = await cp.post("/me/keys", headers=h, json={"name": "third"})
    assert 409 == r.status
    assert 204 == (await cp.delete(f"/me/keys/{key['id']}", headers=h)).status
    assert 401 == await call_model(cp, key["key"])
    r = await cp.get("/me/keys", headers=h, params={"status": "revoked"})
    assert [key["id"]] == [k["id"] for k in (await r.json())["data"]]
    assert "key" not in (await r.json())["data"][0]  # the plaintext is shown once only


async def test_mass_assignment_is_rejected_and_changes_nothing(cp):
    """Fields an endpoint does not own (role, owner, spend, hashes, ids) are 400s naming the field."""
    alice, alice_token, bob, bob_key, _ = await _setup(cp)
    h = bearer(alice_token)
    attempts = [
        ("PATCH", "/me", h, {"role": "admin"}, "role"),
        ("PATCH", "/me", h, {"limits": {"rpm": 1000000}}, "limits"),
        ("PATCH", "/me", h, {"disabled": False, "name": "x"}, "disabled"),
        ("POST", "/me/keys", h, {"user_id": bob["id"]}, "user_id"),
        ("POST", "/admin/users", ADMIN, {"email": "m@example.com", "spend": 0}, "spend"),
        ("POST", "/admin/users", ADMIN, {"email": "m@example.com", "id": NIL}, "id"),
        ("PATCH", f"/admin/users/{alice['id']}", ADMIN, {"password_hash": "$argon2id$x"}, "password_hash"),
        ("PATCH", f"/admin/keys/{bob_key['id']}", ADMIN, {"user_id": alice["id"]}, "user_id"),
        ("PATCH", f"/admin/keys/{bob_key['id']}", ADMIN, {"key_hash": "0" * 64}, "key_hash"),
        ("PATCH", f"/admin/keys/{bob_key['id']}", ADMIN, {"revoked_at": None}, "revoked_at"),
        ("PATCH", f"/admin/keys/{bob_key['id']}", ADMIN, {"limits": {"spend_usd": 0}}, "spend_usd"),
    ]
    for method, path, headers, body, field in attempts:
        r = await cp.request(method, path, headers=headers, json=body)
        assert 400 == r.status, (path, body)
        assert field == (await r.json())["error"]["field"], (path, body)
    me = await (await cp.get("/me", headers=h)).json()
    assert "user" == me["role"]
    key = await (await cp.get(f"/admin/keys/{bob_key['id']}", headers=ADMIN)).json()
    assert bob["id"] == key["user_id"]


async def test_every_input_is_validated_with_a_clear_400(cp):
    """Bad emails, passwords, roles, limits, expiry, pagination and ids get 400 (or 404 for ids)."""
    user = await create_user(cp, "val@example.com")
    bad = [
        ("/admin/users", {"email": "not-an-email"}, "email"),
        ("/admin/users", {"email": "a@example.com", "password": "short"}, "password"),
        ("/admin/users", {"email": "a@example.com", "role": "root"}, "role"),
        ("/admin/users", {"email": "a@example.com", "limits": {"rpm": -1}}, "limits.rpm"),
        ("/admin/users", {"email": "a@example.com", "limits": {"rpm": "10"}}, "limits.rpm"),
        ("/admin/users", {"email": "a@example.com", "limits": {"allowed_ips": ["10.0.0.0/33"]}}, "limits.allowed_ips"),
        ("/admin/users", {"email": "a@example.com", "limits": {"budget_period": "week"}}, "limits.budget_period"),
        ("/admin/users", {"email": "a@example.com", "limits": []}, "limits"),
        ("/admin/keys", {"user_id": "nope"}, "user_id"),
        ("/admin/keys", {"user_id": NIL}, "user_id"),
        ("/admin/keys", {"user_id": user["id"], "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ("/admin/keys", {"user_id": user["id"], "expires_at": "2099-01-01T00:00:00"}, "expires_at"),
    ]
    for path, body, field in bad:
        r = await cp.post(path, headers=ADMIN, json=body)
        assert 400 == r.status, body
        assert field == (await r.json())["error"]["field"], body
    r = await cp.post("/admin/users", headers={**ADMIN, "content-type": "application/json"}, data=b"[1,2")
    assert 400 == r.status
    for params in ({"limit": "0"}, {"limit": "x"}, {"cursor": "garbage!"}, {"role": "root"}):
        assert 400 == (await cp.get("/admin/users", headers=ADMIN, params=params)).status, params
    assert 404 == (await cp.get("/admin/users/12345", headers=ADMIN)).status
    assert 404 == (await cp.get(f"/admin/users/{NIL}", headers=ADMIN)).status
    r = await cp.post("/admin/users", headers=ADMIN, json={"email": "VAL@example.com"})
    assert 409 == r.status


async def test_lists_paginate_with_a_cursor_and_filter(cp):
    """limit + next_cursor walk every user exactly once; filters narrow the list."""
    for i in range(5):
        await create_user(cp, f"page{i}@example.com", role="admin" if i == 0 else "user")
    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await (await cp.get("/admin/users", headers=ADMIN, params=params)).json()
        seen += [u["email"] for u in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(f"page{i}@example.com" for i in range(5)) == sorted(seen)
    admins = await (await cp.get("/admin/users", headers=ADMIN, params={"role": "admin"})).json()
    assert ["page0@example.com"] == [u["email"] for u in admins["data"]]
    found = await (await cp.get("/admin/users", headers=ADMIN, params={"email": "PAGE3"})).json()
    assert ["page3@example.com"] == [u["email"] for u in found["data"]]


async def test_admins_cannot_lock_themselves_out(cp):
    """An admin cannot demote, disable or delete itself."""
    me = await create_user(cp, "self@example.com", role="admin")
    h = bearer((await login(cp, "self@example.com"))["access_token"])
    for body in ({"role": "user"}, {"disabled": True}):
        assert 400 == (await cp.patch(f"/admin/users/{me['id']}", headers=h, json=body)).status
    assert 400 == (await cp.delete(f"/admin/users/{me['id']}", headers=h)).status


async def test_deleting_a_user_revokes_its_keys_and_sessions(cp):
    """DELETE /admin/users/{id}: the user is gone, its keys stop, its refresh token dies."""
    user = await create_user(cp, "gone@example.com")
    key = await create_key(cp, user["id"])
    t = await login(cp, "gone@example.com")
    assert 200 == await call_model(cp, key["key"])
    assert 204 == (await cp.delete(f"/admin/users/{user['id']}", headers=ADMIN)).status
    assert 404 == (await cp.get(f"/admin/users/{user['id']}", headers=ADMIN)).status
    assert 401 == await call_model(cp, key["key"])
    assert 401 == (await cp.post("/auth/refresh", json={"refresh_token": t["refresh_token"]})).status


async def test_changes_are_written_to_the_audit_log_without_secrets(cp):
    """Each change leaves an audit row (actor, action, target); no key or password in it."""
    user = await create_user(cp, "aud@example.com")
    key = await create_key(cp, user["id"])
    await cp.delete(f"/admin/keys/{key['id']}", headers=ADMIN)
    r = await cp.get("/admin/audit", headers=ADMIN)
    rows = (await r.json())["data"]
    actions = [(row["action"], row["actor"]) for row in rows]
    assert ("key.revoke", "bootstrap") in actions
    assert ("key.create", "bootstrap") in actions
    assert ("user.create", "bootstrap") in actions
    text = await r.text()
    assert key["key"] not in text
    assert "correct horse" not in text


async def test_the_control_plane_is_described_by_an_openapi_document(cp):
    """GET /openapi.json (no auth) lists every control-plane path."""
    r = await cp.get("/openapi.json")
    assert 200 == r.status
    spec = await r.json()
    assert "3.1.0" == spec["openapi"]
    for path in ("/auth/login", "/auth/refresh", "/auth/logout", "/admin/users", "/admin/users/{id}",
                 "/admin/keys", "/admin/keys/{id}", "/me", "/me/keys", "/me/keys/{id}"):
        assert path in spec["paths"]
