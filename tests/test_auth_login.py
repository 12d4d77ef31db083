"""Login, refresh rotation, reuse detection, logout, throttling and access-token checks."""

from __future__ import annotations

import time
import warnings

import jwt

from tests.fixtures.control_plane import (
    ADMIN,
    JWT_SECRET,
    PASSWORD,
    bearer,
    create_user,
    login,
)


async def test_login_returns_a_short_lived_access_token_and_a_refresh_token(cp):
    """POST /auth/login with the right password answers tokens that /me accepts."""
    user = await create_user(cp, "ann@example.com")
    tokens = await login(cp, "ANN@example.com")
    assert "Bearer" == tokens["token_type"]
    assert 900 == tokens["expires_in"]
    assert tokens["refresh_token"].startswith("gwr_")
    assert "password_hash" not in tokens["user"]
    r = await cp.get("/me", headers=bearer(tokens["access_token"]))
    assert 200 == r.status
    assert user["id"] == (await r.json())["id"]


async def test_unknown_user_and_wrong_password_get_the_same_answer(cp):
    """An unknown email and a wrong password are indistinguishable (status and body)."""
    await create_user(cp, "bob@example.com")
    r1 = await cp.post("/auth/login", json={"email": "bob@example.com", "password": "wrong password!"})
    r2 = await cp.post("/auth/login", json={"email": "nobody@example.com", "password": "wrong password!"})
    assert 401 == r1.status == r2.status
    assert await r1.json() == await r2.json()


async def test_disabled_user_cannot_log_in_and_gets_the_generic_answer(cp):
    """A disabled user's correct password gets the same 401 as a wrong one."""
    await create_user(cp, "dis@example.com", disabled=True)
    r = await cp.post("/auth/login", json={"email": "dis@example.com", "password": PASSWORD})
    assert 401 == r.status
    assert "invalid_credentials" == (await r.json())["error"]["code"]


async def test_repeated_failures_are_throttled_for_known_and_unknown_emails(cp):
    """After 5 failures an email is locked (429 with retry-after), even with the right password."""
    await create_user(cp, "carl@example.com")
    for email in ("carl@example.com", "ghost@example.com"):
        for _ in range(5):
            r = await cp.post("/auth/login", json={"email": email, "password": "not the password"})
            assert 401 == r.status
        r = await cp.post("/auth/login", json={"email": email, "password": PASSWORD})
        assert 429 == r.status
        assert "too_many_attempts" == (await r.json())["error"]["code"]
        assert int(r.headers["retry-after"]) >= 1


async def test_login_validates_its_input(cp):
    """Missing fields, wrong types and unknown fields are clear 400s."""
    for body, field in (({"email": "a@b.co"}, "password"), ({"email": 3, "password": "x"}, "email"),
                        ({"email": "a@b.co", "password": "x" * 20, "role": "admin"}, "role")):
        r = await cp.post("/auth/login", json=body)
        assert 400 == r.status
        assert field == (await r.json())["error"]["field"]
    r = await cp.post("/auth/login", data=b"{not json", headers={"content-type": "application/json"})
    assert 400 == r.status


async def test_refresh_rotates_and_a_spent_token_is_dead(cp):
    """Each refresh returns a new refresh token; the old one no longer works."""
    await create_user(cp, "dan@example.com")
    t1 = await login(cp, "dan@example.com")
    r = await cp.post("/auth/refresh", json={"refresh_token": t1["refresh_token"]})
    assert 200 == r.status
    t2 = await r.json()
    assert t1["refresh_token"] != t2["refresh_token"]
    assert 200 == (await cp.get("/me", headers=bearer(t2["access_token"]))).status


async def test_reusing_a_spent_refresh_token_revokes_the_whole_family(cp):
    """Replaying a rotated token kills it and its successor: both parties must log in again."""
    await create_user(cp, "eve@example.com")
    t1 = await login(cp, "eve@example.com")
    t2 = await (await cp.post("/auth/refresh", json={"refresh_token": t1["refresh_token"]})).json()
    replay = await cp.post("/auth/refresh", json={"refresh_token": t1["refresh_token"]})
    assert 401 == replay.status
    assert "refresh_token_reused" == (await replay.json())["error"]["code"]
    successor = await cp.post("/auth/refresh", json={"refresh_token": t2["refresh_token"]})
    assert 401 == successor.status
    assert 401 == (await cp.get("/me", headers=bearer(t2["access_token"]))).status
    # Another login (another family) is unaffected.
    t3 = await login(cp, "eve@example.com")
    assert 200 == (await cp.post("/auth/refresh", json={"refresh_token": t3["refresh_token"]})).status


async def test_logout_revokes_the_refresh_token(cp):
    """After logout the session's refresh token is refused."""
    await create_user(cp, "fay@example.com")
    t = await login(cp, "fay@example.com")
    r = await cp.post("/auth/logout", json={"refresh_token": t["refresh_token"]},
                      headers=bearer(t["access_token"]))
    assert 204 == r.status
    r = await cp.post("/auth/refresh", json={"refresh_token": t["refresh_token"]})
    assert 401 == r.status
    # The session's access token ends with it.
    assert 401 == (await cp.get("/me", headers=bearer(t["access_token"]))).status


def _forge(claims: dict, secret: str = JWT_SECRET, alg: str = "HS256") -> str:
    now = int(time.time())
    base = {"iss": "llm-gateway", "aud": "llm-gateway-admin", "iat": now, "exp": now + 60, "role": "admin"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HS512 with our (HS256-sized) secret: the attack we test
        return jwt.encode({**base, **claims}, secret, algorithm=alg)


async def test_access_tokens_with_bad_signature_audience_issuer_expiry_or_algorithm_are_refused(cp):
    """Only HS256 tokens signed with our secret, for our issuer and audience, unexpired, pass."""
    await create_user(cp, "gil@example.com", role="admin")
    real = await login(cp, "gil@example.com")
    claims = jwt.decode(real["access_token"], options={"verify_signature": False})
    sub = claims["sub"]
    good = _forge({"sub": sub, "sid": claims["sid"]})
    assert 200 == (await cp.get("/admin/users", headers=bearer(good))).status
    bad = [
        _forge({"sub": sub}),  # no session id
        _forge({"sub": sub, "sid": "00000000-0000-0000-0000-000000000000"}),  # no such session
        _forge({"sub": "not-a-uuid", "sid": claims["sid"]}),
        _forge({"sub": sub}, secret="another-secret-" + "x" * 32),
        _forge({"sub": sub, "sid": claims["sid"], "aud": "someone-else"}),
        _forge({"sub": sub, "sid": claims["sid"], "iss": "someone-else"}),
        _forge({"sub": sub, "sid": claims["sid"], "exp": int(time.time()) - 60}),
        _forge({"sub": sub, "sid": claims["sid"]}, alg="HS512"),
        jwt.encode({"sub": sub, "sid": claims["sid"], "iss": "llm-gateway", "aud": "llm-gateway-admin", "exp": int(time.time()) + 60,
                    "iat": int(time.time())}, key="", algorithm="none"),
        "not-a-token",
    ]
    for token in bad:
        r = await cp.get("/admin/users", headers=bearer(token))
        assert 401 == r.status, token
        assert "unauthorized" == (await r.json())["error"]["code"]


async def test_a_disabled_users_access_token_stops_working_at_once(cp):
    """The user is re-read on every call: disabling revokes access before the token expires."""
    user = await create_user(cp, "hal@example.com")
    t = await login(cp, "hal@example.com")
    r = await cp.patch(f"/admin/users/{user['id']}", headers=ADMIN, json={"disabled": True})
    assert 200 == r.status
    assert 401 == (await cp.get("/me", headers=bearer(t["access_token"]))).status
    assert 401 == (await cp.post("/auth/refresh", json={"refresh_token": t["refresh_token"]})).status
