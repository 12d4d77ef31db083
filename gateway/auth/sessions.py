"""Login sessions: refresh-token families with rotation and reuse detection.

A login starts a family.  Each refresh spends the presented token and issues
the next one in the family.  Presenting a spent token means it was copied:
the whole family is revoked, so both the thief and the user must log in again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from gateway.auth.tokens import hash_token, new_refresh_token


@dataclass(frozen=True, slots=True)
class Rotated:
    user_id: str
    token: str
    family_id: str


class RefreshRejected(Exception):
    """The refresh token is unknown, expired, revoked, or was reused (``reused``)."""

    def __init__(self, reason: str, *, reused: bool = False, user_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reused = reused
        self.user_id = user_id


async def start_family(conn: asyncpg.Connection, user_id: str, ttl_s: int) -> tuple[str, str]:
    """A new session: (refresh token, family id)."""
    token = new_refresh_token()
    family = uuid.uuid4()
    await conn.execute(
        "INSERT INTO refresh_tokens (family_id, user_id, token_hash, expires_at) VALUES ($1, $2, $3, $4)",
        family, user_id, hash_token(token), datetime.now(UTC) + timedelta(seconds=ttl_s),
    )
    return token, str(family)


async def purge_expired(conn: asyncpg.Connection, grace_days: int = 7) -> None:
    """Forget sessions that expired over ``grace_days`` ago (their reuse can no longer matter)."""
    await conn.execute("DELETE FROM refresh_tokens WHERE expires_at < now() - make_interval(days => $1)", grace_days)


async def session_live(conn: asyncpg.Connection, family_id: str) -> bool:
    """False once the session was logged out, revoked for reuse, or its user disabled."""
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM refresh_tokens WHERE family_id = $1 AND revoked_at IS NULL)", family_id,
    ))


async def rotate(conn: asyncpg.Connection, token: str, ttl_s: int) -> Rotated:
    """Spend ``token`` and return its successor (call inside a transaction)."""
    r = await conn.fetchrow(
        "SELECT t.id, t.family_id, t.user_id, t.expires_at, t.used_at, t.revoked_at, "
        "       u.disabled, u.deleted_at "
        "FROM refresh_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1 FOR UPDATE OF t",
        hash_token(token),
    )
    if r is None:
        raise RefreshRejected("unknown refresh token")
    user_id = str(r["user_id"])
    if r["revoked_at"] is not None:
        raise RefreshRejected("the refresh token was revoked", user_id=user_id)
    if r["used_at"] is not None:
        await revoke_family(conn, r["family_id"], "reuse detected")
        raise RefreshRejected("the refresh token was already used", reused=True, user_id=user_id)
    if r["expires_at"] <= datetime.now(UTC):
        raise RefreshRejected("the refresh token has expired", user_id=user_id)
    if r["disabled"] or r["deleted_at"] is not None:
        await revoke_family(conn, r["family_id"], "user disabled")
        raise RefreshRejected("the user is disabled", user_id=user_id)
    await conn.execute("UPDATE refresh_tokens SET used_at = now() WHERE id = $1", r["id"])
    successor = new_refresh_token()
    await conn.execute(
        "INSERT INTO refresh_tokens (family_id, user_id, token_hash, expires_at) VALUES ($1, $2, $3, $4)",
        r["family_id"], r["user_id"], hash_token(successor), datetime.now(UTC) + timedelta(seconds=ttl_s),
    )
    return Rotated(user_id=user_id, token=successor, family_id=str(r["family_id"]))


async def revoke_family(conn: asyncpg.Connection, family_id: uuid.UUID, reason: str) -> None:
    await conn.execute(
        "UPDATE refresh_tokens SET revoked_at = now(), revoked_reason = $2 "
        "WHERE family_id = $1 AND revoked_at IS NULL", family_id, reason,
    )


async def logout(conn: asyncpg.Connection, token: str) -> str | None:
    """Revoke the family of ``token``; the user id, or None if the token is unknown."""
    r = await conn.fetchrow("SELECT family_id, user_id FROM refresh_tokens WHERE token_hash = $1", hash_token(token))
    if r is None:
        return None
    await revoke_family(conn, r["family_id"], "logout")
    return str(r["user_id"])


async def revoke_user(conn: asyncpg.Connection, user_id: str, reason: str) -> None:
    await conn.execute(
        "UPDATE refresh_tokens SET revoked_at = now(), revoked_reason = $2 "
        "WHERE user_id = $1 AND revoked_at IS NULL", user_id, reason,
    )
