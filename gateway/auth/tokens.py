"""Access tokens (short-lived JWTs) and opaque refresh tokens.

JWTs are HS256 only (the allow-list: a token naming any other algorithm,
``none`` included, is rejected) and must carry our issuer, audience, expiry,
issue time and subject.  Refresh tokens are random strings stored as SHA-256.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

import jwt

from gateway.auth.settings import AuthSettings

ALGORITHMS = ["HS256"]
REFRESH_PREFIX = "gwr_"
LEEWAY_S = 5


class InvalidToken(Exception):
    """An access token that is malformed, forged, expired or for another audience."""


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: str
    role: str
    expires_at: int
    session_id: str


def issue_access_token(settings: AuthSettings, user_id: str, role: str, session_id: str) -> tuple[str, int]:
    """A signed JWT and its lifetime in seconds; ``sid`` ties it to its login session (logout ends both)."""
    now = int(time.time())
    ttl = settings.cfg.access_token_seconds
    payload = {
        "iss": settings.cfg.jwt_issuer,
        "aud": settings.cfg.jwt_audience,
        "sub": user_id,
        "sid": session_id,
        "role": role,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(payload, settings.jwt_secret, algorithm=ALGORITHMS[0]), ttl


def verify_access_token(settings: AuthSettings, token: str) -> AccessClaims:
    if not settings.jwt_secret:
        raise InvalidToken("token login is not configured")
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=ALGORITHMS,
            audience=settings.cfg.jwt_audience,
            issuer=settings.cfg.jwt_issuer,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iat", "sub", "sid", "iss", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("the access token has expired") from None
    except jwt.InvalidTokenError:
        raise InvalidToken("the access token is invalid") from None
    sub, role, sid = claims.get("sub"), claims.get("role"), claims.get("sid")
    if not isinstance(sub, str) or not isinstance(role, str) or not isinstance(sid, str):
        raise InvalidToken("the access token is invalid")
    try:
        uuid.UUID(sub)
        uuid.UUID(sid)
    except ValueError:
        raise InvalidToken("the access token is invalid") from None
    return AccessClaims(user_id=sub, role=role, expires_at=int(claims["exp"]), session_id=sid)


def new_refresh_token() -> str:
    return REFRESH_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
