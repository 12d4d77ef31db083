"""Throttling of failed logins, shared by all workers through Postgres.

Subjects are the email (hashed, so unknown emails are not stored in clear)
and the client IP.  After ``login_max_failures`` failures within the window
an email is locked for ``login_lockout_seconds``, doubling with each further
failure up to 15 minutes; an IP gets the same after
``login_max_failures_per_ip``.  Unknown and known emails are treated alike.
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta

import asyncpg

from gateway.config import AuthConfig

MAX_LOCK_S = 900
PURGE_CHANCE = 0.01  # of failures that also purge finished rows


def subjects(email: str, ip: str) -> tuple[str, str]:
    return "e:" + hashlib.sha256(email.encode()).hexdigest(), "i:" + ip


async def locked_for(conn: asyncpg.Connection, email: str, ip: str) -> float:
    """Seconds until the email or IP may try again (0: not locked)."""
    until = await conn.fetchval(
        "SELECT max(locked_until) FROM login_throttle WHERE subject = ANY($1::text[]) AND locked_until > now()",
        list(subjects(email, ip)),
    )
    if until is None:
        return 0.0
    return max(0.0, float((until - datetime.now(UTC)).total_seconds()))


async def record_failure(conn: asyncpg.Connection, cfg: AuthConfig, email: str, ip: str) -> None:
    window = timedelta(seconds=cfg.login_window_seconds)
    for subject, limit in zip(subjects(email, ip), (cfg.login_max_failures, cfg.login_max_failures_per_ip),
                              strict=True):
        if limit <= 0:
            continue  # 0 disables (e.g. per-IP behind a load balancer that hides client addresses)
        await conn.execute(
            """
            INSERT INTO login_throttle AS t (subject, failures, window_start) VALUES ($1, 1, now())
            ON CONFLICT (subject) DO UPDATE SET
                failures = CASE WHEN t.window_start < now() - $2::interval THEN 1 ELSE t.failures + 1 END,
                window_start = CASE WHEN t.window_start < now() - $2::interval THEN now() ELSE t.window_start END
            """,
            subject, window,
        )
        await conn.execute(
            """
            UPDATE login_throttle SET locked_until = now() + make_interval(secs =>
                least($3::float8, $2::float8 * power(2, failures - $4)))
            WHERE subject = $1 AND failures >= $4
            """,
            subject, float(cfg.login_lockout_seconds), float(MAX_LOCK_S), limit,
        )
    if random.random() < PURGE_CHANCE:
        await purge(conn, cfg)


async def purge(conn: asyncpg.Connection, cfg: AuthConfig) -> None:
    """Forget subjects whose window and lock are over (keeps the table small under guessing floods)."""
    await conn.execute(
        "DELETE FROM login_throttle WHERE window_start < now() - $1::interval "
        "AND (locked_until IS NULL OR locked_until < now())",
        timedelta(seconds=cfg.login_window_seconds),
    )


async def clear(conn: asyncpg.Connection, email: str) -> None:
    await conn.execute("DELETE FROM login_throttle WHERE subject = $1", subjects(email, "")[0])
