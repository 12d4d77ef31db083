"""Single sign-on: ``GET /auth/oidc/login`` -> identity provider -> ``GET /auth/oidc/callback``.

Login starts an authorization-code flow with PKCE (S256): a fresh ``state``
(also set as an HttpOnly cookie, so a callback only completes in the browser
that started it), ``nonce`` and code verifier, kept in Postgres for
``login_ttl_seconds`` so that any worker can take the callback, which
consumes them once.  The callback exchanges the code, verifies the ID token
(``auth/oidc.py``), maps claims to a user (just-in-time creation when
``create_users``), its role (``role_claim`` values) and team (``team_claim``,
by team name), and answers the gateway's own access and refresh tokens, the
same as ``/auth/login`` (JSON; or a redirect to ``return_to`` with the tokens
in the URL fragment, for the console).  Password login stays for break-glass
admins.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import structlog
from aiohttp import web

from gateway import keys
from gateway.admin.common import invalidate
from gateway.auth import sessions
from gateway.auth.handlers import _db, _settings, _tokens
from gateway.auth.oidc import OidcClient, OidcError, new_pkce
from gateway.auth.responses import api_error, bad_request, json_response, unavailable
from gateway.governance_config import OidcConfig
from gateway.stores import audit, oidc, teams, users
from gateway.stores.audit import Actor
from gateway.stores.postgres import DatabaseUnavailable

log = structlog.get_logger("oidc")

COOKIE = "gw_oidc_state"
_RETURN_TO = re.compile(r"^/[A-Za-z0-9/_.~-]{0,200}$")
_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")


def _client(request: web.Request) -> OidcClient:
    client = request.app.get(keys.OIDC)
    if client is None:
        raise api_error(404, "not_found", "Single sign-on is not configured on this gateway.")
    return client


async def _discover(client: OidcClient) -> Any:
    try:
        return await client.discovery()
    except OidcError as exc:
        log.warning("identity provider unavailable", error=str(exc))
        raise unavailable("The identity provider is unavailable; retry shortly.") from None


async def login(request: web.Request) -> web.Response:
    client = _client(request)
    _settings(request)  # the gateway must be able to issue its own tokens
    db = _db(request)
    return_to = request.query.get("return_to")
    if return_to is not None and (not _RETURN_TO.match(return_to) or return_to.startswith("//")):
        raise bad_request("return_to: must be a path on this gateway (e.g. /console/).", field="return_to")
    d = await _discover(client)
    state, nonce, pkce = secrets.token_urlsafe(32), secrets.token_urlsafe(32), new_pkce()
    ttl = client.cfg.login_ttl_seconds
    try:
        async with db.connection() as conn:
            await oidc.begin(conn, state, nonce, pkce.verifier, return_to, datetime.now(UTC) + timedelta(seconds=ttl))
    except DatabaseUnavailable:
        raise unavailable() from None
    url = client.authorization_url(d, state, nonce, pkce)
    if request.query.get("mode") == "json":
        resp: web.Response = json_response({"authorization_url": url, "expires_in": ttl})
    else:
        resp = web.Response(status=302, headers={"location": url, "cache-control": "no-store"})
    resp.set_cookie(COOKIE, state, max_age=ttl, path="/auth/oidc", httponly=True, samesite="Lax",
                    secure=client.cfg.redirect_uri.startswith("https://"))
    return resp


def _values(claim: Any) -> set[str]:
    if isinstance(claim, str):
        return {claim}
    if isinstance(claim, list):
        return {c for c in claim if isinstance(c, str)}
    return set()


def role_of(cfg: OidcConfig, claims: dict[str, Any]) -> str:
    values = _values(claims.get(cfg.role_claim))
    if values & set(cfg.admin_values):
        return "admin"
    if values & set(cfg.team_admin_values):
        return "team_admin"
    return "user"


def _refuse(message: str) -> web.HTTPException:
    return api_error(403, "forbidden", message)


async def provision(conn: Any, cfg: OidcConfig, claims: dict[str, Any]) -> users.User:
    """The gateway user behind these verified claims: linked, found by email, or created; role and team synced."""
    email = claims.get("email")
    if not isinstance(email, str) or "@" not in email or len(email) > 254:
        raise _refuse("The identity provider sent no email address for this account.")
    email = email.strip().lower()
    if claims.get("email_verified") is False:
        raise _refuse("The identity provider has not verified this account's email address.")
    if cfg.allowed_domains and email.rsplit("@", 1)[1] not in cfg.allowed_domains:
        raise _refuse("Accounts of this email domain may not sign in here.")
    role = role_of(cfg, claims)
    team_id: str | None = None
    if cfg.team_claim and role != "admin":
        names = sorted(_values(claims.get(cfg.team_claim)))
        team = await teams.get_by_name(conn, names[0]) if names else None
        if names and team is None:
            log.info("sso team claim names no team", team_claim=cfg.team_claim)
        team_id = team.id if team is not None else None
    issuer, subject = str(claims["iss"]), str(claims["sub"])
    user_id = await oidc.linked_user(conn, issuer, subject)
    user = await users.get(conn, user_id) if user_id else await users.get_by_email(conn, email)
    if user is None:
        if user_id is not None or not cfg.create_users:
            raise _refuse("There is no gateway account for this identity; ask an admin to create one.")
        name = claims.get("name") if isinstance(claims.get("name"), str) else ""
        user = await users.create(conn, email=email, name=str(name)[:200], role=role)
    if user.disabled:
        raise _refuse("This account is disabled.")
    if user.role != role:
        updated = await users.update(conn, user.id, {"role": role})
        user = updated or user
    if cfg.team_claim:
        await conn.execute("UPDATE users SET team_id = $2, updated_at = now() WHERE id = $1 "
                           "AND team_id IS DISTINCT FROM $2::uuid", user.id, team_id)
    await oidc.link(conn, issuer, subject, user.id, email)
    return user


async def callback(request: web.Request) -> web.Response:
    client = _client(request)
    settings = _settings(request)
    db = _db(request)
    q = request.query
    if "error" in q:
        code = q["error"] if _ERROR_CODE.match(q["error"]) else "error"
        raise api_error(401, "sso_refused", f"The identity provider refused the login ({code}).")
    state, code = q.get("state", ""), q.get("code", "")
    cookie = request.cookies.get(COOKIE, "")
    if not state or not cookie or not hmac.compare_digest(state.encode(), cookie.encode()):
        raise api_error(400, "invalid_state", "This sign-in was not started in this browser (state mismatch); "
                                              "start again at /auth/oidc/login.")
    if not code or len(code) > 2048:
        raise bad_request("code: missing.", field="code")
    try:
        async with db.connection() as conn:
            pending = await oidc.consume(conn, state)
        if pending is None:
            raise api_error(400, "invalid_state", "This sign-in has expired or was already used; start again.")
        d = await _discover(client)
        try:
            id_token = await client.exchange(d, code, pending.code_verifier)
            claims = await client.verify(d, id_token, pending.nonce)
        except OidcError as exc:
            log.warning("sso login rejected", reason=str(exc))
            raise api_error(401, "invalid_id_token", f"Sign-in failed: {exc}.") from None
        async with db.transaction() as conn:
            user = await provision(conn, client.cfg, claims)
            refresh, session_id = await sessions.start_family(conn, user.id, settings.cfg.refresh_token_seconds)
            ctx = request.get(keys.REQ_CTX)
            actor = Actor("user", user.id, ctx.request_id if ctx is not None else None, request.remote)
            await audit.record(conn, actor, "auth.oidc_login", "user", user.id, {"role": user.role})
        invalidate(request, user_id=user.id)  # role or team may have changed (NOTIFY tells the others)
    except DatabaseUnavailable:
        raise unavailable() from None
    body = await _tokens(settings, user, refresh, session_id)
    if pending.return_to:
        frag = urlencode({k: body[k] for k in ("access_token", "refresh_token", "expires_in", "token_type")})
        resp: web.Response = web.Response(status=302, headers={"location": f"{pending.return_to}#{frag}",
                                                               "cache-control": "no-store"})
    else:
        resp = json_response(body)
        resp.headers["cache-control"] = "no-store"
    resp.del_cookie(COOKIE, path="/auth/oidc")
    return resp


async def oidc_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the relying party when [oidc] enabled (database mode)."""
    cfg = app[keys.CONFIG]
    if not cfg.oidc.enabled or cfg.standalone:
        yield
        return
    client = OidcClient(cfg.oidc, cfg.env(cfg.oidc.client_secret_env))
    app[keys.OIDC] = client
    yield
    await client.close()


def setup(app: web.Application) -> None:
    app.router.add_get("/auth/oidc/login", login)
    app.router.add_get("/auth/oidc/callback", callback)
    app.cleanup_ctx.append(oidc_ctx)
