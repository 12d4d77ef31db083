"""Webhook delivery of alert events: claimed once, signed, retried with backoff, status in Postgres.

A delivery round claims due events with ``FOR UPDATE SKIP LOCKED`` and, in
the same statement, pushes their next attempt out by a lease; so two
gateways never post the same event at once, and an event whose deliverer
died mid-flight is retried when the lease ends.  A 2xx answer marks it
delivered; anything else (or no answer) schedules the next attempt after
``retry_base_seconds * 2^(attempts-1)`` (capped), and after ``max_attempts``
it is marked failed.  Every attempt is signed anew (fresh timestamp).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import aiohttp
import asyncpg
import orjson

from gateway.alerts import signing
from gateway.governance_config import AlertsConfig

_CLAIM = """
UPDATE alert_events SET attempts = attempts + 1, next_attempt_at = now() + $2::interval
WHERE id IN (
    SELECT id FROM alert_events WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED
)
RETURNING id, payload, webhook_url, attempts
"""

_DELIVERED = """
UPDATE alert_events SET status = 'delivered', delivered_at = now(), last_status = $2, last_error = NULL
WHERE id = $1 AND status = 'pending'
"""

_FAILED = """
UPDATE alert_events SET last_status = $2, last_error = $3,
       status = CASE WHEN attempts >= $4 THEN 'failed' ELSE 'pending' END,
       next_attempt_at = now() + $5::interval
WHERE id = $1 AND status = 'pending'
"""

BATCH = 20


@dataclass(frozen=True, slots=True)
class Attempt:
    event_id: int
    body: bytes
    url: str
    attempts: int


def backoff(cfg: AlertsConfig, attempts: int) -> float:
    return float(min(cfg.retry_max_seconds, cfg.retry_base_seconds * 2 ** max(0, attempts - 1)))


def body_of(event_id: int, payload: dict[str, object]) -> bytes:
    return orjson.dumps({"id": event_id, **payload})


async def claim(conn: asyncpg.Connection, lease_s: float) -> list[Attempt]:
    rows = await conn.fetch(_CLAIM, BATCH, timedelta(seconds=lease_s))
    return [Attempt(r["id"], body_of(r["id"], r["payload"]), r["webhook_url"], r["attempts"]) for r in rows]


async def post(session: aiohttp.ClientSession, secret: str, attempt: Attempt,
               timeout_s: float) -> tuple[int | None, str | None]:
    """(HTTP status, error) of one signed POST; never raises for network trouble."""
    headers = {
        "content-type": "application/json",
        "user-agent": "llm-gateway-alerts",
        signing.HEADER: signing.signature(secret, int(time.time()), attempt.body),
        signing.EVENT_HEADER: str(attempt.event_id),
        "x-gateway-delivery-attempt": str(attempt.attempts),
    }
    try:
        async with session.post(attempt.url, data=attempt.body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False) as r:
            await r.read()
            return r.status, None if 200 <= r.status < 300 else f"HTTP {r.status}"
    except (TimeoutError, aiohttp.ClientError) as exc:
        return None, type(exc).__name__


async def record(conn: asyncpg.Connection, cfg: AlertsConfig, attempt: Attempt, status: int | None,
                 error: str | None) -> None:
    if error is None:
        await conn.execute(_DELIVERED, attempt.event_id, status)
    else:
        await conn.execute(_FAILED, attempt.event_id, status, error[:200], cfg.max_attempts,
                           timedelta(seconds=backoff(cfg, attempt.attempts)))
