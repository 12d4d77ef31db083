"""Who is calling the control plane: ``identify(request)`` and ``require_admin(request)``.

A caller presents ``Authorization: Bearer <token>`` where the token is either
a JWT access token from ``/auth/login`` or the bootstrap admin token from the
environment.  A JWT's user is re-read from Postgres on every call, so that
disabling, deleting or demoting a user takes effect at once, not at expiry.

Failures raise JSON HTTP errors (401 unauthenticated, 403 not allowed, 503
database down) that any aiohttp handler can let propagate.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from gateway import keys
from gateway.auth import sessions
from gateway.auth.responses import api_error, unavailable
from gateway.auth.tokens import InvalidToken, verify_access_token
from gateway.stores import users
from gateway.stores.audit import Actor
from gateway.stores.postgres import DatabaseUnavailable

_IDENTITY: web.RequestKey[Identity] = web.RequestKey("gw_identity")


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str | None  # None for the bootstrap token, which has no user account
    role: str  # 'admin' | 'user'
    via: str  # 'jwt' | 'bootstrap'
    email: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def actor(self, request: web.Request) -> Actor:
        ctx = request.get(keys.REQ_CTX)
        return Actor(
            kind="user" if self.user_id else "bootstrap",
            user_id=self.user_id,
            request_id=ctx.request_id if ctx is not None else None,
            ip=request.remote,
        )


def _unauthorized(message: str) -> web.HTTPException:
    return api_error(401, "unauthorized", message, headers={"www-authenticate": 'Bearer realm="llm-gateway"'})


def bearer_token(request: web.Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() != "bearer ":
        return ""
    return auth[7:].strip()


async def identify(request: web.Request) -> Identity:
    """The authenticated caller, or raise 401 (or 503 when Postgres cannot tell)."""
    if _IDENTITY in request:
        return request[_IDENTITY]
    token = bearer_token(request)
    if not token:
        raise _unauthorized("Missing credentials: send Authorization: Bearer <access token>.")
    settings = request.app[keys.AUTH]
    if settings.bootstrap_token and hmac.compare_digest(token.encode(), settings.bootstrap_token.encode()):
        ident = Identity(user_id=None, role="admin", via="bootstrap")
    else:
        try:
            claims = verify_access_token(settings, token)
        except InvalidToken as exc:
            raise _unauthorized(f"Invalid credentials: {exc}.") from None
        db = request.app.get(keys.PG)
        if db is None:
            raise unavailable("User accounts need a database; this gateway runs standalone.")
        try:
            async with db.connection() as conn:
                user = await users.get(conn, claims.user_id)
                live = await sessions.session_live(conn, claims.session_id)
        except DatabaseUnavailable:
            raise unavailable() from None
        if user is None or user.disabled:
            raise _unauthorized("Invalid credentials: the user no longer exists or is disabled.")
        if not live:
            raise _unauthorized("Invalid credentials: this session has ended (logged out or revoked).")
        ident = Identity(user_id=user.id, role=user.role, via="jwt", email=user.email)
    request[_IDENTITY] = ident
    ctx = request.get(keys.REQ_CTX)
    if ctx is not None:
        ctx.user_id = ident.user_id or "bootstrap"
    return ident


async def require_admin(request: web.Request) -> Identity:
    """identify(), then 403 unless the caller is an admin."""
    ident = await identify(request)
    if not ident.is_admin:
        raise api_error(403, "forbidden", "This endpoint needs the admin role.")
    return ident


async def require_user(request: web.Request) -> Identity:
    """identify(), then 403 for the bootstrap token (it has no user account for /me)."""
    ident = await identify(request)
    if ident.user_id is None:
        raise api_error(403, "forbidden", "The bootstrap token has no user account; log in as a user.")
    return ident
