"""/auth/login, /auth/refresh, /auth/logout.

Login answers an unknown email, a wrong password and a disabled user with the
same 401 body after the same argon2 work; repeated failures are throttled
(429 with retry-after) per email and per client IP.
"""

from __future__ import annotations

import random
from typing import Any

import structlog
from aiohttp import web

from gateway import keys
from gateway.auth import sessions, throttle
from gateway.auth.guard import identify
from gateway.auth.passwords import MAX_PASSWORD_LEN, Passwords
from gateway.auth.responses import api_error, bad_request, json_response, read_json_object, unavailable
from gateway.auth.settings import AuthSettings
from gateway.auth.tokens import issue_access_token
from gateway.stores import audit, users
from gateway.stores.audit import Actor
from gateway.stores.postgres import Database, DatabaseUnavailable

PASSWORDS: web.AppKey[Passwords] = web.AppKey("passwords")
log = structlog.get_logger("auth")

_INVALID = "Invalid email or password."
PURGE_CHANCE = 0.01  # of logins that also purge long-expired sessions


def _db(request: web.Request) -> Database:
    db = request.app.get(keys.PG)
    if db is None:
        raise unavailable("User accounts need a database; this gateway runs standalone.")
    return db


def _settings(request: web.Request) -> AuthSettings:
    s = request.app[keys.AUTH]
    if not s.jwt_secret:
        raise unavailable(f"Login is not configured: set {s.cfg.jwt_secret_env} (32+ characters).")
    return s


def _string(doc: dict[str, Any], name: str, max_len: int) -> str:
    v = doc.get(name)
    if not isinstance(v, str) or not v:
        raise bad_request(f"{name}: a non-empty string is required.", field=name)
    if len(v) > max_len:
        raise bad_request(f"{name}: at most {max_len} characters.", field=name)
    return v


def _only(doc: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(doc) - allowed)
    if extra:
        raise bad_request(f"Unknown field(s): {', '.join(extra)}.", field=extra[0], code="unknown_field")


async def _tokens(settings: AuthSettings, user: users.User, refresh: str, session_id: str) -> dict[str, Any]:
    access, ttl = issue_access_token(settings, user.id, user.role, session_id)
    return {
        "access_token": access, "token_type": "Bearer", "expires_in": ttl,
        "refresh_token": refresh, "refresh_expires_in": settings.cfg.refresh_token_seconds,
        "user": user.public(),
    }


def _actor(request: web.Request, user_id: str | None) -> Actor:
    ctx = request.get(keys.REQ_CTX)
    return Actor("user", user_id, ctx.request_id if ctx is not None else None, request.remote)


async def login(request: web.Request) -> web.Response:
    settings = _settings(request)
    db = _db(request)
    doc = await read_json_object(request)
    _only(doc, {"email", "password"})
    email = _string(doc, "email", 254).strip().lower()
    password = _string(doc, "password", MAX_PASSWORD_LEN)
    ip = request.remote or ""
    passwords = request.app[PASSWORDS]
    try:
        async with db.connection() as conn:
            # The attempt is reserved before any hashing: concurrent guesses cannot outrun the count.
            wait = await throttle.reserve(conn, settings.cfg, email, ip)
            if wait > 0:
                raise api_error(429, "too_many_attempts", "Too many failed logins; retry later.",
                                retry_after_s=wait)
            user = await users.get_by_email(conn, email)
        ok = await passwords.verify(user.password_hash if user else None, password)
        async with db.connection() as conn:
            if not ok or user is None or user.disabled:
                await throttle.failed(conn, settings.cfg, email, ip)
                log.info("login failed", user=user.id if user else None)
                raise api_error(401, "invalid_credentials", _INVALID)
            async with conn.transaction():
                await throttle.succeeded(conn, settings.cfg, email, ip)
                refresh, session_id = await sessions.start_family(conn, user.id, settings.cfg.refresh_token_seconds)
                await audit.record(conn, _actor(request, user.id), "auth.login", "user", user.id)
            if random.random() < PURGE_CHANCE:
                await sessions.purge_expired(conn)
            if user.password_hash and passwords.needs_rehash(user.password_hash):
                await users.update(conn, user.id, {"password_hash": await passwords.hash(password)})
    except DatabaseUnavailable:
        raise unavailable() from None
    return json_response(await _tokens(settings, user, refresh, session_id))


async def refresh(request: web.Request) -> web.Response:
    _settings(request)  # 503 before reading a body that cannot be used
    _db(request)
    doc = await read_json_object(request)
    _only(doc, {"refresh_token"})
    return await refresh_with(request, _string(doc, "refresh_token", 512))


async def refresh_with(request: web.Request, token: str) -> web.Response:
    """Rotate ``token``: the answer of /auth/refresh (also the console's cookie refresh)."""
    settings = _settings(request)
    db = _db(request)
    rejected: sessions.RefreshRejected | None = None
    try:
        async with db.connection() as conn:
            async with conn.transaction():
                try:
                    rotated = await sessions.rotate(conn, token, settings.cfg.refresh_token_seconds)
                except sessions.RefreshRejected as exc:
                    rejected = exc  # commit what rotate() revoked before answering
            if rejected is not None:
                if rejected.reused and rejected.user_id:
                    await audit.record(conn, _actor(request, rejected.user_id), "auth.refresh_reuse", "user",
                                       rejected.user_id, {"family_revoked": True})
                    log.warning("refresh token reuse; family revoked", user=rejected.user_id)
                code = "refresh_token_reused" if rejected.reused else "invalid_refresh_token"
                raise api_error(401, code, f"Invalid refresh token: {rejected.reason}.")
            user = await users.get(conn, rotated.user_id)
    except DatabaseUnavailable:
        raise unavailable() from None
    if user is None:
        raise api_error(401, "invalid_refresh_token", "Invalid refresh token: the user no longer exists.")
    return json_response(await _tokens(settings, user, rotated.token, rotated.family_id))


async def logout(request: web.Request) -> web.Response:
    """Revoke the session (refresh-token family) of the given refresh token; always 204."""
    _db(request)
    doc = await read_json_object(request)
    _only(doc, {"refresh_token"})
    return await logout_with(request, _string(doc, "refresh_token", 512))


async def logout_with(request: web.Request, token: str, *, check_bearer: bool = True) -> web.Response:
    """Revoke the session of ``token``: the answer of /auth/logout (also the console's, whose
    cookie alone names the session: an expired access token must not keep it alive)."""
    db = _db(request)
    if check_bearer and request.headers.get("authorization"):
        await identify(request)  # a stale or forged access token is an error, not ignored
    try:
        async with db.transaction() as conn:
            user_id = await sessions.logout(conn, token)
            if user_id is not None:
                await audit.record(conn, _actor(request, user_id), "auth.logout", "user", user_id)
    except DatabaseUnavailable:
        raise unavailable() from None
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    app[keys.AUTH] = AuthSettings.from_config(app[keys.CONFIG])
    app[PASSWORDS] = Passwords(app[keys.CONFIG].auth)
    app.router.add_post("/auth/login", login)
    app.router.add_post("/auth/refresh", refresh)
    app.router.add_post("/auth/logout", logout)
