"""Typed queries on ``users`` (no ORM).  Deleted users are invisible here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from gateway.config import Limits
from gateway.stores.limits_codec import limits_from_json, limits_to_json

_COLUMNS = "id, email, name, role, disabled, limits, password_hash, created_at, updated_at"
# The only columns an update may touch (the API layer decides who may set which).
UPDATABLE = frozenset({"email", "name", "role", "disabled", "limits", "password_hash"})


class EmailTaken(Exception):
    """Another user already has this email address."""


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    name: str
    role: str
    disabled: bool
    limits: Limits
    password_hash: str | None
    created_at: datetime
    updated_at: datetime

    def public(self) -> dict[str, Any]:
        """The JSON the API shows: never the password hash."""
        return {
            "id": self.id, "email": self.email, "name": self.name, "role": self.role,
            "disabled": self.disabled, "limits": limits_to_json(self.limits),
            "created_at": self.created_at, "updated_at": self.updated_at,
        }


def _user(r: asyncpg.Record) -> User:
    return User(
        id=str(r["id"]), email=r["email"], name=r["name"], role=r["role"], disabled=r["disabled"],
        limits=limits_from_json(r["limits"]), password_hash=r["password_hash"],
        created_at=r["created_at"], updated_at=r["updated_at"],
    )


async def get(conn: asyncpg.Connection, user_id: str) -> User | None:
    r = await conn.fetchrow(f"SELECT {_COLUMNS} FROM users WHERE id = $1 AND deleted_at IS NULL", user_id)  # noqa: S608 - constant SQL, values are $n parameters
    return _user(r) if r else None


async def get_by_email(conn: asyncpg.Connection, email: str) -> User | None:
    r = await conn.fetchrow(f"SELECT {_COLUMNS} FROM users WHERE email = $1 AND deleted_at IS NULL", email)  # noqa: S608 - constant SQL, values are $n parameters
    return _user(r) if r else None


async def create(conn: asyncpg.Connection, *, email: str, name: str = "", password_hash: str | None = None,
                 role: str = "user", disabled: bool = False, limits: Limits | None = None) -> User:
    try:
        r = await conn.fetchrow(
            f"INSERT INTO users (email, name, password_hash, role, disabled, limits) "  # noqa: S608 - constant SQL, values are $n parameters
            f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}",
            email, name, password_hash, role, disabled, limits_to_json(limits or Limits()),
        )
    except asyncpg.UniqueViolationError:
        raise EmailTaken(email) from None
    return _user(r)


async def update(conn: asyncpg.Connection, user_id: str, changes: dict[str, Any]) -> User | None:
    """Set the given columns (names from UPDATABLE only); None if no such live user."""
    bad = set(changes) - UPDATABLE
    if bad:
        raise ValueError(f"not updatable: {sorted(bad)}")
    if not changes:
        return await get(conn, user_id)
    sets: list[str] = []
    args: list[Any] = [user_id]
    for col, value in changes.items():
        args.append(limits_to_json(value) if col == "limits" else value)
        sets.append(f"{col} = ${len(args)}")
    try:
        r = await conn.fetchrow(
            f"UPDATE users SET {', '.join(sets)}, updated_at = now() "  # noqa: S608 - constant SQL, values are $n parameters
            f"WHERE id = $1 AND deleted_at IS NULL RETURNING {_COLUMNS}",
            *args,
        )
    except asyncpg.UniqueViolationError:
        raise EmailTaken(str(changes.get("email"))) from None
    return _user(r) if r else None


async def soft_delete(conn: asyncpg.Connection, user_id: str) -> bool:
    """Delete a user: disable, free the email, revoke its keys and sessions (call in a transaction)."""
    done = await conn.fetchval(
        "UPDATE users SET deleted_at = now(), disabled = true, updated_at = now() "
        "WHERE id = $1 AND deleted_at IS NULL RETURNING true", user_id,
    )
    if not done:
        return False
    await conn.execute(
        "UPDATE access_keys SET revoked_at = now(), updated_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
        user_id,
    )
    await conn.execute(
        "UPDATE refresh_tokens SET revoked_at = now(), revoked_reason = 'user deleted' "
        "WHERE user_id = $1 AND revoked_at IS NULL", user_id,
    )
    return True


async def list_page(conn: asyncpg.Connection, *, limit: int, after: tuple[datetime, str] | None = None,
                    email: str | None = None, role: str | None = None,
                    disabled: bool | None = None) -> list[User]:
    """Keyset pagination on (created_at, id); email is a case-insensitive substring."""
    where: list[str] = ["deleted_at IS NULL"]
    args: list[Any] = []
    if after is not None:
        args += [after[0], after[1]]
        where.append(f"(created_at, id) > (${len(args) - 1}, ${len(args)})")
    if email:
        args.append("%" + email.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        where.append(f"email LIKE ${len(args)}")
    if role is not None:
        args.append(role)
        where.append(f"role = ${len(args)}")
    if disabled is not None:
        args.append(disabled)
        where.append(f"disabled = ${len(args)}")
    args.append(limit)
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM users WHERE {' AND '.join(where)} ORDER BY created_at, id LIMIT ${len(args)}",  # noqa: S608 - constant SQL, values are $n parameters
        *args,
    )
    return [_user(r) for r in rows]
