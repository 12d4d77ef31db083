"""Key rotation: a new secret on the same key row; the old secret lives on until its grace ends.

The key keeps its id, so limits, Redis counters and the ledger's budget
history carry over untouched.  The previous secret's hash moves to
``access_key_previous_hashes`` with ``valid_until``; the principal resolved
from it expires at that instant, so every worker that cached it stops
accepting it then without any message (the cache checks ``expires_at`` on
every request).  Updating ``key_hash`` notifies every worker, which drops
its cached entries for the key and re-reads both secrets.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from gateway.policy.principals import display_prefix, hash_key
from gateway.stores.access_keys import _COLUMNS, AccessKey, _key, new_key

DEFAULT_GRACE_SECONDS = 24 * 3600
MAX_GRACE_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Rotation:
    key: AccessKey
    plaintext: str
    previous_prefix: str
    previous_valid_until: datetime


async def rotate(conn: asyncpg.Connection, key_id: str, grace: timedelta, *,
                 user_id: str | None = None, user_ids: list[str] | None = None) -> Rotation | None:
    """Rotate a live key (in the caller's transaction); None if missing, revoked or not the caller's.

    ``user_id`` restricts to one owner (/me), ``user_ids`` to a set of owners (a team admin).
    Earlier previous secrets of this key end no later than this rotation's grace.
    """
    row = await conn.fetchrow(
        "SELECT key_hash, prefix, user_id FROM access_keys WHERE id = $1 AND revoked_at IS NULL FOR UPDATE",
        key_id,
    )
    if row is None:
        return None
    owner = str(row["user_id"])
    if (user_id is not None and owner != user_id) or (user_ids is not None and owner not in user_ids):
        return None
    now = await conn.fetchval("SELECT now()")
    until = now + grace
    await conn.execute(
        "UPDATE access_key_previous_hashes SET valid_until = $2 WHERE key_id = $1 AND valid_until > $2",
        key_id, until,
    )
    await conn.execute(
        "INSERT INTO access_key_previous_hashes (key_hash, key_id, prefix, valid_until) VALUES ($1, $2, $3, $4)",
        row["key_hash"], key_id, row["prefix"], until,
    )
    # Spent secrets whose grace is over are of no further use.
    await conn.execute(
        "DELETE FROM access_key_previous_hashes WHERE key_id = $1 AND valid_until < $2::timestamptz - interval '1 day'",
        key_id, now,
    )
    plaintext = new_key()
    r = await conn.fetchrow(
        f"UPDATE access_keys SET key_hash = $2, prefix = $3, updated_at = now() WHERE id = $1 "  # noqa: S608 - constant SQL, values are $n parameters
        f"RETURNING {_COLUMNS}",
        key_id, hash_key(plaintext), display_prefix(plaintext),
    )
    return Rotation(_key(r), plaintext, row["prefix"], until)


async def previous_secrets(conn: asyncpg.Connection, key_id: str) -> list[dict[str, object]]:
    rows = await conn.fetch(
        "SELECT prefix, valid_until, rotated_at FROM access_key_previous_hashes "
        "WHERE key_id = $1 AND valid_until > now() ORDER BY rotated_at", key_id,
    )
    return [dict(r) for r in rows]
