"""Throttling of logins, shared by all workers through Postgres: reserve, then evaluate.

Subjects are the email (hashed, so unknown emails are not stored in clear)
and the client IP.  Every attempt first *reserves* a slot, atomically and
before any password is hashed: within ``login_window_seconds`` an email gets
``login_max_failures`` attempts (an IP ``login_max_failures_per_ip``).  The
attempt that reaches the limit locks the subject while it is evaluated (at
most ``EVALUATING_S``); if it fails, the lock becomes ``login_lockout_seconds``,
doubling with each further failure up to 15 minutes.  A locked subject's
attempts are refused without being evaluated, so 120 parallel guesses for one
email evaluate at most the limit, and a correct password arriving after them
is refused too.  A successful login clears the email's count (and its lock)
and gives the IP its slot back, so a few parallel logins of one account that
all succeed are at most briefly told to retry.  Unknown and known emails are
treated alike.
"""

from __future__ import annotations

import hashlib
import random
from datetime import timedelta

import asyncpg

from gateway.config import AuthConfig

MAX_LOCK_S = 900
EVALUATING_S = 5.0  # the lock held while the attempt that reached the limit is being evaluated
PURGE_CHANCE = 0.01  # of failures that also purge finished rows


def subjects(email: str, ip: str) -> tuple[str, str]:
    return "e:" + hashlib.sha256(email.encode()).hexdigest(), "i:" + ip


def _limited(cfg: AuthConfig, email: str, ip: str) -> list[tuple[str, int]]:
    pairs = zip(subjects(email, ip), (cfg.login_max_failures, cfg.login_max_failures_per_ip), strict=True)
    # 0 disables (e.g. per-IP behind a load balancer that hides client addresses).
    return sorted((s, limit) for s, limit in pairs if limit > 0)  # one lock order for every caller


async def reserve(conn: asyncpg.Connection, cfg: AuthConfig, email: str, ip: str) -> float:
    """Take one attempt for the email and the IP; 0 when it may be evaluated, else seconds to wait.

    One round trip to ``login_reserve`` (migrations/0031): the subjects' rows
    are locked in one order, so concurrent attempts for the same email are
    counted one after another and the lock is held for microseconds.
    """
    limited = _limited(cfg, email, ip)
    if not limited:
        return 0.0
    wait = await conn.fetchval(
        "SELECT login_reserve($1::text[], $2::int[], $3::interval, $4, $5, $6)",
        [s for s, _ in limited], [limit for _, limit in limited], timedelta(seconds=cfg.login_window_seconds),
        EVALUATING_S, float(cfg.login_lockout_seconds), float(MAX_LOCK_S),
    )
    return float(wait)


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


async def failed(conn: asyncpg.Connection, cfg: AuthConfig, email: str, ip: str) -> None:
    """A failed login (already counted by its reservation): a subject at its limit is locked for real."""
    for subject, limit in _limited(cfg, email, ip):
        await conn.execute(
            """
            UPDATE login_throttle SET locked_until = greatest(coalesce(locked_until, now()), now() + make_interval(
                secs => least($3::float8, $2::float8 * power(2, failures - $4))))
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
