"""Typed queries on ``alert_rules`` and ``alert_events`` (migration 0023)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

RULE_COLUMNS = ("id, scope, target_id, name, budget_micros, period, thresholds, webhook_url, enabled, "
                "created_by, created_at, updated_at")
EVENT_COLUMNS = ("id, rule_id, period_start, threshold, spend_micros, budget_micros, payload, webhook_url, "
                 "fired_at, status, attempts, next_attempt_at, last_status, last_error, delivered_at")
UPDATABLE = frozenset({"name", "budget_micros", "period", "thresholds", "webhook_url", "enabled"})
SCOPE_TABLE = {"key": "access_keys", "user": "users", "team": "teams"}


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    scope: str
    target_id: str
    name: str
    budget_micros: int | None
    period: str | None
    thresholds: tuple[int, ...]
    webhook_url: str
    enabled: bool
    created_by: str | None
    created_at: datetime
    updated_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "scope": self.scope, "target_id": self.target_id, "name": self.name,
            "budget_usd": None if self.budget_micros is None else self.budget_micros / 1_000_000,
            "period": self.period, "thresholds": list(self.thresholds), "webhook_url": self.webhook_url,
            "enabled": self.enabled, "created_at": self.created_at, "updated_at": self.updated_at,
        }


def _rule(r: asyncpg.Record) -> Rule:
    return Rule(
        id=str(r["id"]), scope=r["scope"], target_id=str(r["target_id"]), name=r["name"],
        budget_micros=r["budget_micros"], period=r["period"], thresholds=tuple(r["thresholds"]),
        webhook_url=r["webhook_url"], enabled=r["enabled"],
        created_by=str(r["created_by"]) if r["created_by"] else None,
        created_at=r["created_at"], updated_at=r["updated_at"],
    )


def public_event(r: asyncpg.Record) -> dict[str, Any]:
    d = dict(r)
    d["rule_id"] = str(d["rule_id"])
    d["spend_usd"] = d.pop("spend_micros") / 1_000_000
    d["budget_usd"] = d.pop("budget_micros") / 1_000_000
    return d


async def target_exists(conn: asyncpg.Connection, scope: str, target_id: str) -> bool:
    table = SCOPE_TABLE[scope]
    deleted = "" if scope == "key" else " AND deleted_at IS NULL"
    return bool(await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE id = $1{deleted})",  # noqa: S608 - table from a closed set
                                    target_id))


async def create(conn: asyncpg.Connection, *, scope: str, target_id: str, name: str, budget_micros: int | None,
                 period: str | None, thresholds: tuple[int, ...], webhook_url: str,
                 created_by: str | None) -> Rule:
    r = await conn.fetchrow(
        f"INSERT INTO alert_rules (scope, target_id, name, budget_micros, period, thresholds, webhook_url, "  # noqa: S608 - constant SQL
        f"created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {RULE_COLUMNS}",
        scope, target_id, name, budget_micros, period, list(thresholds), webhook_url, created_by,
    )
    return _rule(r)


async def get(conn: asyncpg.Connection, rule_id: str) -> Rule | None:
    r = await conn.fetchrow(f"SELECT {RULE_COLUMNS} FROM alert_rules WHERE id = $1", rule_id)  # noqa: S608 - constant SQL
    return _rule(r) if r else None


async def update(conn: asyncpg.Connection, rule_id: str, changes: dict[str, Any]) -> Rule | None:
    bad = set(changes) - UPDATABLE
    if bad:
        raise ValueError(f"not updatable: {sorted(bad)}")
    if not changes:
        return await get(conn, rule_id)
    args: list[Any] = [rule_id]
    sets = []
    for col, value in changes.items():
        args.append(list(value) if col == "thresholds" else value)
        sets.append(f"{col} = ${len(args)}")
    r = await conn.fetchrow(
        f"UPDATE alert_rules SET {', '.join(sets)}, updated_at = now() WHERE id = $1 RETURNING {RULE_COLUMNS}",  # noqa: S608 - columns from UPDATABLE
        *args,
    )
    return _rule(r) if r else None


async def delete(conn: asyncpg.Connection, rule_id: str) -> bool:
    status: str = await conn.execute("DELETE FROM alert_rules WHERE id = $1", rule_id)
    return status != "DELETE 0"


async def list_rules(conn: asyncpg.Connection, *, limit: int, after: tuple[datetime, str] | None = None,
                     scope: str | None = None, target_id: str | None = None) -> list[Rule]:
    where: list[str] = []
    args: list[Any] = []
    if scope is not None:
        args.append(scope)
        where.append(f"scope = ${len(args)}")
    if target_id is not None:
        args.append(target_id)
        where.append(f"target_id = ${len(args)}")
    if after is not None:
        args += [after[0], after[1]]
        where.append(f"(created_at, id) > (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    cond = f"WHERE {' AND '.join(where)} " if where else ""
    rows = await conn.fetch(
        f"SELECT {RULE_COLUMNS} FROM alert_rules {cond}ORDER BY created_at, id LIMIT ${len(args)}", *args,  # noqa: S608 - constant SQL
    )
    return [_rule(r) for r in rows]


async def list_events(conn: asyncpg.Connection, *, limit: int, rule_id: str | None = None,
                      status: str | None = None, before_id: int | None = None) -> list[dict[str, Any]]:
    where: list[str] = []
    args: list[Any] = []
    for col, val in (("rule_id", rule_id), ("status", status)):
        if val is not None:
            args.append(val)
            where.append(f"{col} = ${len(args)}")
    if before_id is not None:
        args.append(before_id)
        where.append(f"id < ${len(args)}")
    args.append(limit)
    cond = f"WHERE {' AND '.join(where)} " if where else ""
    rows = await conn.fetch(
        f"SELECT {EVENT_COLUMNS} FROM alert_events {cond}ORDER BY id DESC LIMIT ${len(args)}", *args,  # noqa: S608 - constant SQL
    )
    return [public_event(r) for r in rows]
