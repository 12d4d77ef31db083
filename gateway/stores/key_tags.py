"""A key's default cost-attribution tags (``access_keys.tags``, migration 0021)."""

from __future__ import annotations

import asyncpg


async def get(conn: asyncpg.Connection, key_id: str, *, user_id: str | None = None,
              user_ids: list[str] | None = None) -> dict[str, str] | None:
    r = await conn.fetchrow("SELECT user_id, tags FROM access_keys WHERE id = $1", key_id)
    if r is None or not _owned(str(r["user_id"]), user_id, user_ids):
        return None
    return dict(r["tags"])


async def put(conn: asyncpg.Connection, key_id: str, tags: dict[str, str], *, user_id: str | None = None,
              user_ids: list[str] | None = None) -> dict[str, str] | None:
    r = await conn.fetchrow("SELECT user_id FROM access_keys WHERE id = $1 AND revoked_at IS NULL FOR UPDATE",
                            key_id)
    if r is None or not _owned(str(r["user_id"]), user_id, user_ids):
        return None
    await conn.execute("UPDATE access_keys SET tags = $2, updated_at = now() WHERE id = $1", key_id, tags)
    return tags


def _owned(owner: str, user_id: str | None, user_ids: list[str] | None) -> bool:
    return (user_id is None or owner == user_id) and (user_ids is None or owner in user_ids)
