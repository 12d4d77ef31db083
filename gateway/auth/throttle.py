"""Throttling of logins, shared by all workers through Postgres: reserve, then evaluate.

Subjects are the email (hashed, so unknown emails are not stored in clear)
and the client IP.  Every attempt first *reserves* a slot, atomically and
before any password is hashed: within ``login_window_seconds`` an email gets
``login_max_failures`` attempts (an IP ``login_max_failures_per_ip``); the
attempt that reaches the limit locks the subject for
``login_lockout_seconds``, doubling with each further attempt up to 15
minutes.  A locked subject's attempts are refused without being evaluated, so
120 parallel guesses for one email evaluate at most the limit, and a correct
password arriving after them is refused too.  A successful login clears the
email's count and gives the IP its slot back.  Unknown and known emails are
treated alike.
"""

from __future__ import annotations

import hashlib
import random
from datetime import datetime, timedelta

import asyncpg

from gateway.config import AuthConfig

MAX_LOCK_S = 900
PURGE_CHANCE = 0.01  # of failures that also purge finished rows


def subjects(email: str, ip: str) -> tuple[str, str]:
    return "e:" + hashlib.sha256(email.encode()).hexdigest(), "i:" + ip


def _limited(cfg: AuthConfig, email: str, ip: str) -> list[tuple[str, int]]:
    pairs = zip(subjects(email, ip), (cfg.login_max_failures, cfg.login_max_failures_per_ip), strict=True)
    # 0 disables (e.g. per-IP behind a load balancer that hides client addresses).
    return sorted((s, limit) for s, limit in pairs if limit > 0)  # one lock order for every caller


def lock_seconds(cfg: AuthConfig, attempts: int, limit: int) -> float:
    """The lock an attempt count earns: from login_lockout_seconds at the limit, doubling, capped."""
    return min(float(MAX_LOCK_S), float(cfg.login_lockout_seconds) * 2.0 ** max(0, attempts - limit))


async def reserve(conn: asyncpg.Connection, cfg: AuthConfig, email: str, ip: str) -> float:
    """Take one attempt for the email and the IP; 0 when it may be evaluated, else seconds to wait.

    One transaction with the subjects' rows locked (in one order), so
    concurrent attempts for the same email are counted one after another.
    """
    limited = _limited(cfg, email, ip)
    if not limited:
        return 0.0
    names = [s for s, _ in limited]
    window = timedelta(seconds=cfg.login_window_seconds)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO login_throttle (subject, failures, window_start) "
            "SELECT s, 0, now() FROM unnest($1::text[]) AS s ON CONFLICT (subject) DO NOTHING",
            names,
        )
        rows = await conn.fetch(
            "SELECT subject, failures, window_start, locked_until, now() AS now FROM login_throttle "
            "WHERE subject = ANY($1::text[]) ORDER BY subject FOR UPDATE",
            names,
        )
        now: datetime = rows[0]["now"]
        waits = [(r["locked_until"] - now).total_seconds() for r in rows
                 if r["locked_until"] is not None and r["locked_until"] > now]
        if waits:
            return float(max(waits))  # refused: not counted, not evaluated
        limits = dict(limited)
        counts, starts, locks = [], [], []
        for r in rows:
            fresh = r["window_start"] < now - window
            count = 1 if fresh else r["failures"] + 1
            limit = limits[r["subject"]]
            counts.append(count)
            starts.append(now if fresh else r["window_start"])
            locks.append(now + timedelta(seconds=lock_seconds(cfg, count, limit)) if count >= limit else None)
        await conn.execute(
            "UPDATE login_throttle AS t SET failures = u.failures, window_start = u.window_start, "
            "locked_until = u.locked_until FROM unnest($1::text[], $2::int[], $3::timestamptz[], $4::timestamptz[]) "
            "AS u(subject, failures, window_start, locked_until) WHERE t.subject = u.subject",
            [r["subject"] for r in rows], counts, starts, locks,
        )
    return 0.0


async def succeeded(conn: asyncpg.Connection, cfg: AuthConfig, email: str, ip: str) -> None:
    """A successful login: the email starts over, the IP gets its attempt back."""
    email_subject, ip_subject = subjects(email, ip)
    await conn.execute("DELETE FROM login_throttle WHERE subject = $1", email_subject)
    if cfg.login_max_failures_per_ip > 0:
        await conn.execute(
            "UPDATE login_throttle SET failures = greatest(failures - 1, 0), "
            "locked_until = CASE WHEN failures - 1 < $2 THEN NULL ELSE locked_until END WHERE subject = $1",
            ip_subject, cfg.login_max_failures_per_ip,
        )


async def failed(conn: asyncpg.Connection, cfg: AuthConfig) -> None:
    """A failed login (already counted by its reservation): now and then, forget finished subjects."""
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

