"""Logins in progress (state -> nonce, PKCE verifier) and linked provider identities (migration 0024)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import asyncpg


def state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class PendingLogin:
    nonce: str
    code_verifier: str
    return_to: str | None


async def begin(conn: asyncpg.Connection, state: str, nonce: str, verifier: str, return_to: str | None,
                expires_at: datetime) -> None:
    await conn.execute(
        "INSERT INTO oidc_logins (state_hash, nonce, code_verifier, return_to, expires_at) VALUES ($1, $2, $3, $4, $5)",
        state_hash(state), nonce, verifier, return_to, expires_at,
    )
    # Abandoned logins: cheap to sweep here, bounded by the login rate.
    await conn.execute("DELETE FROM oidc_logins WHERE expires_at < now() - interval '1 hour'")


async def consume(conn: asyncpg.Connection, state: str) -> PendingLogin | None:
    """The login this state began, at most once and only before it expires."""
    r = await conn.fetchrow(
        "DELETE FROM oidc_logins WHERE state_hash = $1 RETURNING nonce, code_verifier, return_to, "
        "expires_at > now() AS live", state_hash(state),
    )
    if r is None or not r["live"]:
        return None
    return PendingLogin(r["nonce"], r["code_verifier"], r["return_to"])


async def linked_user(conn: asyncpg.Connection, issuer: str, subject: str) -> str | None:
    v = await conn.fetchval("SELECT user_id FROM user_identities WHERE issuer = $1 AND subject = $2", issuer, subject)
    return str(v) if v else None


async def link(conn: asyncpg.Connection, issuer: str, subject: str, user_id: str, email: str) -> None:
    await conn.execute(
        "INSERT INTO user_identities (issuer, subject, user_id, email) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (issuer, subject) DO UPDATE SET last_login_at = now(), email = excluded.email",
        issuer, subject, user_id, email,
    )
