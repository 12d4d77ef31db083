"""Audit log rows: who changed what in the control plane.  Never a secret in ``details``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg


@dataclass(frozen=True, slots=True)
class Actor:
    kind: str  # 'user' | 'bootstrap' | 'cli'
    user_id: str | None = None
    request_id: str | None = None
    ip: str | None = None


CLI = Actor("cli")


async def record(conn: asyncpg.Connection, actor: Actor, action: str, target_type: str, target_id: str,
                 details: dict[str, Any] | None = None) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor_id, actor, action, target_type, target_id, details, request_id, ip) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        actor.user_id, actor.kind, action, target_type, target_id, details or {}, actor.request_id, actor.ip,
    )


async def list_page(conn: asyncpg.Connection, *, limit: int, before_id: int | None = None,
                    target_id: str | None = None) -> list[dict[str, Any]]:
    where: list[str] = []
    args: list[Any] = []
    if before_id is not None:
        args.append(before_id)
        where.append(f"id < ${len(args)}")
    if target_id:
        args.append(target_id)
        where.append(f"target_id = ${len(args)}")
    args.append(limit)
    cond = f"WHERE {' AND '.join(where)} " if where else ""
    rows = await conn.fetch(
        f"SELECT id, at, actor_id, actor, action, target_type, target_id, details, request_id, ip "  # noqa: S608 - constant SQL, values are $n parameters
        f"FROM audit_log {cond}ORDER BY id DESC LIMIT ${len(args)}", *args,
    )
    return [{**dict(r), "actor_id": str(r["actor_id"]) if r["actor_id"] else None} for r in rows]
