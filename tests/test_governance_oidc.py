"""Single sign-on against a local OpenID provider (tests/fixtures/oidc_provider.py), browserless, over HTTP:
authorization code + PKCE, state and nonce, JWKS with key rollover, claims -> role and team, JIT users."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest

from tests.fixtures.control_plane import ADMIN, bearer, create_user, pg_toml
from tests.fixtures.oidc_provider import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, Forge, OidcProvider


@pytest.fixture
async def provider():
    p = OidcProvider()
    await p.server.start_server()
    yield p
    await p.server.close()


def oidc_toml(provider: OidcProvider, extra: str = "") -> str:
    return f"""
    [oidc]
    enabled = true
    issuer = "{provider.issuer}"
    client_id = "{CLIENT_ID}"
    redirect_uri = "{REDIRECT_URI}"
    role_claim = "groups"
    admin_values = ["gw-admins"]
    team_admin_values = ["gw-team-leads"]
    team_claim = "team"
    {extra}
    """


@pytest.fixture
async def sso_gw(make_gateway, mock_upstream, pg_env, provider, monkeypatch):
    monkeypatch.setenv("GATEWAY_OIDC_CLIENT_SECRET", CLIENT_SECRET)
    return await make_gateway(pg_toml(mock_upstream.base_url, oidc_toml(provider)))


def person(sub: str = "sub-1", email: str = "ada@corp.example", **claims: Any) -> dict[str, Any]:
    return {"sub": sub, "email": email, "email_verified": True, "name": "Ada", **claims}


async def start(gw: Any, provider: OidcProvider, claims: dict[str, Any]) -> str:
    """GET /auth/oidc/login, follow to the provider's /authorize; the callback path?query it redirects to."""
    provider.next_claims = claims
    r = await gw.get("/auth/oidc/login", allow_redirects=False)
    assert 302 == r.status, await r.text()
    loc = r.headers["location"]
    assert loc.startswith(provider.issuer + "/authorize?")
    q = parse_qs(urlsplit(loc).query)
    assert "S256" == q["code_challenge_method"][0] and len(q["code_challenge"][0]) == 43
    assert q["state"][0] and q["nonce"][0] and q["state"][0] != q["nonce"][0]
    async with aiohttp.ClientSession() as s, s.get(loc, allow_redirects=False) as r2:
        assert 302 == r2.status, await r2.text()
        cb = urlsplit(r2.headers["location"])
    assert REDIRECT_URI.endswith(cb.path)
    return f"{cb.path}?{cb.query}"


async def sso(gw: Any, provider: OidcProvider, claims: dict[str, Any], forge: Forge | None = None) -> Any:
    callback = await start(gw, provider, claims)
    provider.forge = forge
    return await gw.get(callback, allow_redirects=False)


async def test_sso_creates_the_user_maps_role_and_team_and_its_token_works(sso_gw, provider, pg_env):
    """A first SSO login creates the user just in time; groups map to admin; the gateway's own access
    token then works on /admin; a second login with other groups re-maps role and team."""
    r = await sso(sso_gw, provider, person(groups=["staff", "gw-admins"]))
    assert 200 == r.status, await r.text()
    body = await r.json()
    assert "admin" == body["user"]["role"] and "ada@corp.example" == body["user"]["email"]
    assert 200 == (await sso_gw.get("/admin/users", headers=bearer(body["access_token"]))).status
    assert 200 == (await sso_gw.post("/auth/refresh", json={"refresh_token": body["refresh_token"]})).status

    t = await sso_gw.post("/admin/teams", headers=ADMIN, json={"name": "research"})
    team = await t.json()
    r = await sso(sso_gw, provider, person(groups=["gw-team-leads"], team="research"))
    assert 200 == r.status, await r.text()
    body2 = await r.json()
    assert body["user"]["id"] == body2["user"]["id"] and "team_admin" == body2["user"]["role"]
    h = bearer(body2["access_token"])
    assert 403 == (await sso_gw.get("/admin/users", headers=h)).status  # demoted: checked every call
    assert 403 == (await sso_gw.get("/admin/users", headers=bearer(body["access_token"]))).status
    assert 200 == (await sso_gw.get(f"/admin/teams/{team['id']}", headers=h)).status
    conn = await asyncpg.connect(pg_env)
    try:
        ident = await conn.fetchrow("SELECT issuer, subject, user_id::text FROM user_identities")
        actions = [x["action"] for x in await conn.fetch("SELECT action FROM audit_log WHERE action LIKE 'auth.%'")]
    finally:
        await conn.close()
    assert (provider.issuer, "sub-1", body["user"]["id"]) == tuple(ident)
    assert 2 == actions.count("auth.oidc_login")


@pytest.mark.parametrize(("forge", "reason"), [
    (Forge(tamper=True), "signature"),
    (Forge(stranger_key=True), "signature"),
    (Forge(claims={"nonce": "not-the-nonce-of-this-login"}), "nonce"),
    (Forge(claims={"aud": "another-client"}), "another client"),
    (Forge(claims={"iss": "https://evil.example"}), "another issuer"),
    (Forge(claims={"exp": int(time.time()) - 3600, "iat": int(time.time()) - 4000}), "expired"),
])
async def test_a_bad_id_token_is_refused_and_nobody_is_logged_in(sso_gw, provider, pg_env, forge, reason):
    r = await sso(sso_gw, provider, person(groups=["gw-admins"]), forge=forge)
    assert 401 == r.status
    err = (await r.json())["error"]
    assert "invalid_id_token" == err["code"] and reason in err["message"]
    conn = await asyncpg.connect(pg_env)
    try:
        assert 0 == await conn.fetchval("SELECT count(*) FROM users")
        assert 0 == await conn.fetchval("SELECT count(*) FROM refresh_tokens")
    finally:
        await conn.close()


async def test_state_must_match_the_browser_and_is_single_use(sso_gw, provider, make_gateway, mock_upstream):
    """A wrong state, a callback in another browser (no cookie) or a replayed callback are 400."""
    callback = await start(sso_gw, provider, person())
    path, _, query = callback.partition("?")
    q = parse_qs(query)
    r = await sso_gw.get(f"{path}?code={q['code'][0]}&state=forged-state", allow_redirects=False)
    assert 400 == r.status and "invalid_state" == (await r.json())["error"]["code"]
    async with aiohttp.ClientSession() as other_browser, other_browser.get(
            str(sso_gw.make_url(callback)), allow_redirects=False) as r:
        assert 400 == r.status
    r = await sso_gw.get(callback, allow_redirects=False)
    assert 200 == r.status, await r.text()
    r = await sso_gw.get(callback, allow_redirects=False)  # replay: the login was consumed
    assert 400 == r.status and "invalid_state" == (await r.json())["error"]["code"]
    assert 1 == provider.token_requests  # the refused callbacks never reached the token endpoint


async def test_a_rotated_provider_key_is_fetched_once_and_accepted(sso_gw, provider):
    """After the provider rotates its signing key (old one withdrawn), the next login's token names a
    new kid: the gateway refetches the JWKS once and accepts it."""
    assert 200 == (await sso(sso_gw, provider, person())).status
    fetched = provider.jwks_requests
    provider.rotate(keep_old=False)
    r = await sso(sso_gw, provider, person())
    assert 200 == r.status, await r.text()
    assert fetched + 1 == provider.jwks_requests
    assert 200 == (await sso(sso_gw, provider, person())).status
    assert fetched + 1 == provider.jwks_requests  # cached again


async def test_without_jit_only_existing_accounts_sign_in_and_unverified_emails_never(
        make_gateway, mock_upstream, pg_env, provider, monkeypatch):
    monkeypatch.setenv("GATEWAY_OIDC_CLIENT_SECRET", CLIENT_SECRET)
    gw = await make_gateway(pg_toml(mock_upstream.base_url, oidc_toml(provider, "create_users = false")))
    r = await sso(gw, provider, person(email="stranger@corp.example"))
    assert 403 == r.status
    existing = await create_user(gw, "known@corp.example")
    r = await sso(gw, provider, person(sub="sub-known", email="Known@corp.example", email_verified=False))
    assert 403 == r.status
    r = await sso(gw, provider, person(sub="sub-known", email="Known@corp.example"))
    assert 200 == r.status, await r.text()
    assert existing["id"] == (await r.json())["user"]["id"]


async def test_login_return_to_is_a_local_path_and_gets_the_tokens_in_the_fragment(sso_gw, provider):
    for bad in ("https://evil.example/", "//evil.example/x", "/x?y=1"):
        r = await sso_gw.get("/auth/oidc/login", params={"return_to": bad}, allow_redirects=False)
        assert 400 == r.status, bad
    provider.next_claims = person()
    r = await sso_gw.get("/auth/oidc/login", params={"return_to": "/console/"}, allow_redirects=False)
    async with aiohttp.ClientSession() as s, s.get(r.headers["location"], allow_redirects=False) as r2:
        cb = urlsplit(r2.headers["location"])
    r = await sso_gw.get(f"{cb.path}?{cb.query}", allow_redirects=False)
    assert 302 == r.status
    loc = urlsplit(r.headers["location"])
    assert "/console/" == loc.path and "access_token" in parse_qs(loc.fragment)


async def test_sso_is_404_when_not_configured(cp):
    assert 404 == (await cp.get("/auth/oidc/login", allow_redirects=False)).status
