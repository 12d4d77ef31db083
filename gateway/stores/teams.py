"""Typed queries on ``teams`` and team membership (``users.team_id``, migration 0022)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from gateway.config import Limits
from gateway.stores.limits_codec import limits_from_json, limits_to_json
from gateway.stores.teams_codec import ModelBudgets, model_budgets_from_json, model_budgets_to_json
from gateway.stores.users import _COLUMNS as USER_COLUMNS
from gateway.stores.users import User, _user

_COLUMNS = "id, name, limits, model_budgets, created_at, updated_at"


class TeamNameTaken(Exception):
    """Another live team has this name."""


@dataclass(frozen=True, slots=True)
class Team:
    id: str
    name: str
    limits: Limits
    model_budgets: ModelBudgets
    created_at: datetime
    updated_at: datetime

    def public(self, members: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "limits": limits_to_json(self.limits),
                               "model_budgets": model_budgets_to_json(self.model_budgets),
                               "created_at": self.created_at, "updated_at": self.updated_at}
        if members is not None:
            out["members"] = members
        return out


def _team(r: asyncpg.Record) -> Team:
    return Team(id=str(r["id"]), name=r["name"], limits=limits_from_json(r["limits"]),
                model_budgets=model_budgets_from_json(r["model_budgets"]),
                created_at=r["created_at"], updated_at=r["updated_at"])


async def create(conn: asyncpg.Connection, *, name: str, limits: Limits, model_budgets: ModelBudgets = ()) -> Team:
    try:
        r = await conn.fetchrow(
            f"INSERT INTO teams (name, limits, model_budgets) VALUES ($1, $2, $3) RETURNING {_COLUMNS}",  # noqa: S608 - constant SQL
            name, limits_to_json(limits), model_budgets_to_json(model_budgets),
        )
    except asyncpg.UniqueViolationError:
        raise TeamNameTaken(name) from None
    return _team(r)


async def get(conn: asyncpg.Connection, team_id: str) -> Team | None:
    r = await conn.fetchrow(f"SELECT {_COLUMNS} FROM teams WHERE id = $1 AND deleted_at IS NULL", team_id)  # noqa: S608 - constant SQL
    return _team(r) if r else None


async def get_by_name(conn: asyncpg.Connection, name: str) -> Team | None:
    r = await conn.fetchrow(f"SELECT {_COLUMNS} FROM teams WHERE name = $1 AND deleted_at IS NULL", name)  # noqa: S608 - constant SQL
    return _team(r) if r else None


async def update(conn: asyncpg.Connection, team_id: str, *, name: str | None = None,
                 limits: Limits | None = None, model_budgets: ModelBudgets | None = None) -> Team | None:
    try:
        r = await conn.fetchrow(
            f"UPDATE teams SET name = coalesce($2, name), limits = coalesce($3, limits), "  # noqa: S608 - constant SQL
            f"model_budgets = coalesce($4, model_budgets), updated_at = now() "
            f"WHERE id = $1 AND deleted_at IS NULL RETURNING {_COLUMNS}",
            team_id, name, limits_to_json(limits) if limits is not None else None,
            model_budgets_to_json(model_budgets) if model_budgets is not None else None,
        )
    except asyncpg.UniqueViolationError:
        raise TeamNameTaken(name or "") from None
    return _team(r) if r else None


async def delete(conn: asyncpg.Connection, team_id: str) -> bool:
    """Soft delete; its members leave it (their principals are notified by the triggers)."""
    r = await conn.fetchrow("UPDATE teams SET deleted_at = now(), updated_at = now() "
                            "WHERE id = $1 AND deleted_at IS NULL RETURNING id", team_id)
    if r is None:
        return False
    await conn.execute("UPDATE users SET team_id = NULL, role = CASE WHEN role = 'team_admin' THEN 'user' "
                       "ELSE role END, updated_at = now() WHERE team_id = $1", team_id)
    return True


async def list_page(conn: asyncpg.Connection, *, limit: int, after: tuple[datetime, str] | None) -> list[Team]:
    args: list[Any] = []
    cond = ""
    if after is not None:
        args += [after[0], after[1]]
        cond = " AND (created_at, id) > ($1, $2)"
    args.append(limit)
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM teams WHERE deleted_at IS NULL{cond} ORDER BY created_at, id LIMIT ${len(args)}",  # noqa: S608 - constant SQL
        *args,
    )
    return [_team(r) for r in rows]


async def member_count(conn: asyncpg.Connection, team_id: str) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM users WHERE team_id = $1 AND deleted_at IS NULL", team_id))


async def team_of(conn: asyncpg.Connection, user_id: str) -> str | None:
    v = await conn.fetchval("SELECT team_id FROM users WHERE id = $1 AND deleted_at IS NULL", user_id)
    return str(v) if v else None


async def members(conn: asyncpg.Connection, team_id: str) -> list[User]:
    rows = await conn.fetch(
        f"SELECT {USER_COLUMNS} FROM users WHERE team_id = $1 AND deleted_at IS NULL ORDER BY created_at, id",  # noqa: S608 - constant SQL
        team_id,
    )
    return [_user(r) for r in rows]


async def member_ids(conn: asyncpg.Connection, team_id: str) -> list[str]:
    rows = await conn.fetch("SELECT id FROM users WHERE team_id = $1 AND deleted_at IS NULL", team_id)
    return [str(r["id"]) for r in rows]


async def join(conn: asyncpg.Connection, team_id: str, user_id: str, role: str | None = None) -> bool:
    """Put a user in a team (only from no team: a user is in at most one); False if it is in another."""
    r = await conn.fetchrow(
        "UPDATE users SET team_id = $1, role = coalesce($3, role), updated_at = now() "
        "WHERE id = $2 AND deleted_at IS NULL AND (team_id IS NULL OR team_id = $1) RETURNING id",
        team_id, user_id, role,
    )
    return r is not None


async def leave(conn: asyncpg.Connection, team_id: str, user_id: str) -> bool:
    r = await conn.fetchrow(
        "UPDATE users SET team_id = NULL, role = CASE WHEN role = 'team_admin' THEN 'user' ELSE role END, "
        "updated_at = now() WHERE id = $2 AND team_id = $1 AND deleted_at IS NULL RETURNING id",
        team_id, user_id,
    )
    return r is not None
