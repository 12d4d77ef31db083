"""Typed queries on ``access_keys``: create (hash only), look up, list, change, revoke."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from gateway.config import Limits
from gateway.policy.principals import KEY_PREFIX, Principal, display_prefix, hash_key
from gateway.stores.limits_codec import limits_from_json, limits_to_json
from gateway.stores.teams_codec import model_budgets_from_json

_COLUMNS = ("id, user_id, name, prefix, limits, expires_at, revoked_at, last_used_at, created_by, "
            "created_at, updated_at")
UPDATABLE = frozenset({"name", "limits", "expires_at"})


def new_key() -> str:
    """``gwk_`` + 43 url-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class AccessKey:
    id: str
    user_id: str
    name: str
    prefix: str
    limits: Limits
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_by: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= datetime.now(UTC):
            return "expired"
        return "active"

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "user_id": self.user_id, "name": self.name, "prefix": self.prefix,
            "limits": limits_to_json(self.limits), "status": self.status,
            "expires_at": self.expires_at, "revoked_at": self.revoked_at, "last_used_at": self.last_used_at,
            "created_at": self.created_at, "updated_at": self.updated_at,
        }


def _key(r: asyncpg.Record) -> AccessKey:
    return AccessKey(
        id=str(r["id"]), user_id=str(r["user_id"]), name=r["name"], prefix=r["prefix"],
        limits=limits_from_json(r["limits"]), expires_at=r["expires_at"], revoked_at=r["revoked_at"],
        last_used_at=r["last_used_at"], created_by=str(r["created_by"]) if r["created_by"] else None,
        created_at=r["created_at"], updated_at=r["updated_at"],
    )


async def create(conn: asyncpg.Connection, *, user_id: str, name: str = "", limits: Limits | None = None,
                 expires_at: datetime | None = None, created_by: str | None = None) -> tuple[AccessKey, str]:
    """A new key: the row and the plaintext (shown once, never stored)."""
    plaintext = new_key()
    r = await conn.fetchrow(
        f"INSERT INTO access_keys (user_id, name, key_hash, prefix, limits, expires_at, created_by) "  # noqa: S608 - constant SQL, values are $n parameters
        f"VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_COLUMNS}",
        user_id, name, hash_key(plaintext), display_prefix(plaintext), limits_to_json(limits or Limits()),
        expires_at, created_by,
    )
    return _key(r), plaintext


async def get(conn: asyncpg.Connection, key_id: str, *, user_id: str | None = None) -> AccessKey | None:
    """One key by id; with user_id only if that user owns it."""
    if user_id is None:
        r = await conn.fetchrow(f"SELECT {_COLUMNS} FROM access_keys WHERE id = $1", key_id)  # noqa: S608 - constant SQL, values are $n parameters
    else:
        r = await conn.fetchrow(f"SELECT {_COLUMNS} FROM access_keys WHERE id = $1 AND user_id = $2",  # noqa: S608 - constant SQL, values are $n parameters
                                key_id, user_id)
    return _key(r) if r else None


async def update(conn: asyncpg.Connection, key_id: str, changes: dict[str, Any],
                 *, user_id: str | None = None) -> AccessKey | None:
    bad = set(changes) - UPDATABLE
    if bad:
        raise ValueError(f"not updatable: {sorted(bad)}")
    if not changes:
        return await get(conn, key_id, user_id=user_id)
    sets: list[str] = []
    args: list[Any] = [key_id]
    for col, value in changes.items():
        args.append(limits_to_json(value) if col == "limits" else value)
        sets.append(f"{col} = ${len(args)}")
    owner = ""
    if user_id is not None:
        args.append(user_id)
        owner = f" AND user_id = ${len(args)}"
    r = await conn.fetchrow(
        f"UPDATE access_keys SET {', '.join(sets)}, updated_at = now() "  # noqa: S608 - constant SQL, values are $n parameters
        f"WHERE id = $1 AND revoked_at IS NULL{owner} RETURNING {_COLUMNS}",
        *args,
    )
    return _key(r) if r else None


async def revoke(conn: asyncpg.Connection, key_id: str, *, user_id: str | None = None) -> AccessKey | None:
    """Revoke (idempotent: an already revoked key keeps its first revocation time)."""
    args: list[Any] = [key_id]
    owner = ""
    if user_id is not None:
        args.append(user_id)
        owner = " AND user_id = $2"
    r = await conn.fetchrow(
        f"UPDATE access_keys SET revoked_at = coalesce(revoked_at, now()), updated_at = now() "  # noqa: S608 - constant SQL, values are $n parameters
        f"WHERE id = $1{owner} RETURNING {_COLUMNS}",
        *args,
    )
    return _key(r) if r else None


async def count_active(conn: asyncpg.Connection, user_id: str) -> int:
    n = await conn.fetchval(
        "SELECT count(*) FROM access_keys WHERE user_id = $1 AND revoked_at IS NULL "
        "AND (expires_at IS NULL OR expires_at > now())", user_id,
    )
    return int(n)


async def list_page(conn: asyncpg.Connection, *, limit: int, after: tuple[datetime, str] | None = None,
                    user_id: str | None = None, status: str | None = None,
                    name: str | None = None) -> list[AccessKey]:
    where: list[str] = []
    args: list[Any] = []
    if user_id is not None:
        args.append(user_id)
        where.append(f"user_id = ${len(args)}")
    if after is not None:
        args += [after[0], after[1]]
        where.append(f"(created_at, id) > (${len(args) - 1}, ${len(args)})")
    if status == "active":
        where.append("revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())")
    elif status == "revoked":
        where.append("revoked_at IS NOT NULL")
    elif status == "expired":
        where.append("revoked_at IS NULL AND expires_at <= now()")
    if name:
        args.append(name)
        where.append(f"name = ${len(args)}")
    args.append(limit)
    cond = f"WHERE {' AND '.join(where)} " if where else ""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM access_keys {cond}ORDER BY created_at, id LIMIT ${len(args)}", *args,  # noqa: S608 - constant SQL, values are $n parameters
    )
    return [_key(r) for r in rows]


# ---------------------------------------------------------------- hot path (cache misses)

_LOOKUP = """
SELECT k.id, k.prefix, k.name, k.user_id, k.limits, k.expires_at, k.revoked_at,
       u.limits AS user_limits, u.disabled, u.deleted_at, NULL::timestamptz AS grace_until, k.tags AS key_tags,
       t.id AS team_id, t.limits AS team_limits, t.model_budgets AS team_model_budgets
FROM access_keys k JOIN users u ON u.id = k.user_id
LEFT JOIN teams t ON t.id = u.team_id AND t.deleted_at IS NULL
WHERE k.key_hash = $1
UNION ALL
SELECT k.id, p.prefix, k.name, k.user_id, k.limits, k.expires_at, k.revoked_at,
       u.limits AS user_limits, u.disabled, u.deleted_at, p.valid_until AS grace_until, k.tags AS key_tags,
       t.id AS team_id, t.limits AS team_limits, t.model_budgets AS team_model_budgets
FROM access_key_previous_hashes p JOIN access_keys k ON k.id = p.key_id JOIN users u ON u.id = k.user_id
LEFT JOIN teams t ON t.id = u.team_id AND t.deleted_at IS NULL
WHERE p.key_hash = $1 AND p.valid_until > now()
LIMIT 1
"""


def _expiry(expires_at: datetime | None, grace_until: datetime | None) -> float | None:
    """A rotated-out secret expires when its grace ends (or the key expires, if sooner)."""
    ends = [t.timestamp() for t in (expires_at, grace_until) if t is not None]
    return min(ends) if ends else None


async def lookup_principal(conn: asyncpg.Connection, key_hash: str, timeout: float) -> Principal | None:
    """The principal for a key hash; None if unknown, revoked or its user deleted."""
    r = await conn.fetchrow(_LOOKUP, key_hash, timeout=timeout)
    if r is None or r["revoked_at"] is not None or r["deleted_at"] is not None:
        return None
    return Principal(
        key_id=str(r["id"]),
        key_prefix=r["prefix"],
        key_name=r["name"],
        user_id=str(r["user_id"]),
        key_limits=limits_from_json(r["limits"]),
        user_limits=limits_from_json(r["user_limits"]),
        expires_at=_expiry(r["expires_at"], r["grace_until"]),
        user_disabled=r["disabled"],
        tags=tuple(sorted((r["key_tags"] or {}).items())),
        team_id=str(r["team_id"]) if r["team_id"] else None,
        team_limits=limits_from_json(r["team_limits"]),
        team_model_budgets=model_budgets_from_json(r["team_model_budgets"]),
    )


async def touch_last_used(conn: asyncpg.Connection, key_ids: Iterable[str], at: datetime, timeout: float) -> None:
    await conn.execute(
        "UPDATE access_keys SET last_used_at = $2 WHERE id = ANY($1::uuid[]) "
        "AND (last_used_at IS NULL OR last_used_at < $2)",
        list(key_ids), at, timeout=timeout,
    )


async def live_hash_prefixes(conn: asyncpg.Connection, length: int, timeout: float) -> set[str]:
    """The first ``length`` hex digits of every unrevoked key's hash (the lookup filter)."""
    rows = await conn.fetch(
        "SELECT substr(key_hash, 1, $1) AS p FROM access_keys WHERE revoked_at IS NULL", length, timeout=timeout
    )
    return {r["p"] for r in rows}
