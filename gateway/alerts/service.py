"""The alert loop of one worker: evaluate spend now and then, deliver due webhooks.

Every worker of every gateway runs it; Postgres decides who does what (an
advisory lock for evaluation, SKIP LOCKED claims for deliveries), so adding
workers adds neither duplicate events nor duplicate deliveries.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import structlog
from aiohttp import web

from gateway import keys, tasks
from gateway.alerts import deliver
from gateway.alerts.evaluate import evaluate_once
from gateway.governance_config import AlertsConfig
from gateway.stores.postgres import Database, DatabaseUnavailable

log = structlog.get_logger("alerts")


class AlertService:
    def __init__(self, db: Database, cfg: AlertsConfig, secret: str) -> None:
        self.db = db
        self.cfg = cfg
        self.secret = secret
        self.evaluations = 0
        self.fired = 0
        self.delivered = 0
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._warned = False

    def start(self) -> None:
        self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await tasks.stop(self._task)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        # Start after a random part of a period: workers started together spread out, and a
        # starting worker's first requests do not meet the evaluation's queries.
        next_eval = time.monotonic() + random.uniform(0.2, 1.0) * self.cfg.evaluate_seconds
        failing = False
        tick = min(self.cfg.deliver_seconds, self.cfg.evaluate_seconds)
        await asyncio.sleep(random.uniform(0.5, 1.0) * tick)
        while True:
            try:
                if time.monotonic() >= next_eval:
                    next_eval = time.monotonic() + self.cfg.evaluate_seconds
                    await self.evaluate()
                await self.deliver_due()
                if failing:
                    log.info("alert rounds work again")
                failing = False
            except (DatabaseUnavailable, asyncpg.PostgresError, OSError, TimeoutError) as exc:
                if not failing:  # once per outage, not every tick
                    log.warning("alert round failed; retrying", error=type(exc).__name__)
                failing = True
            await asyncio.sleep(tick)

    async def evaluate(self) -> int | None:
        async with self.db.transaction(timeout=5.0) as conn:
            fired = await evaluate_once(conn)
        self.evaluations += 1
        if fired:
            self.fired += fired
            log.info("spend alerts fired", events=fired)
            if not self.secret and not self._warned:
                log.warning("spend alerts are not delivered: no signing secret", env=self.cfg.secret_env)
                self._warned = True
        return fired

    async def deliver_due(self) -> int:
        if not self.secret:
            return 0  # events stay pending (and visible) until a secret is configured
        assert self._session is not None
        async with self.db.connection(timeout=5.0) as conn:
            claimed = await deliver.claim(conn, lease_s=self.cfg.timeout_seconds * 2 + 5)
        if not claimed:
            return 0
        results = await asyncio.gather(*(
            deliver.post(self._session, self.secret, a, self.cfg.timeout_seconds) for a in claimed))
        done = 0
        async with self.db.connection(timeout=5.0) as conn:
            for attempt, (status, error) in zip(claimed, results, strict=True):
                await deliver.record(conn, self.cfg, attempt, status, error)
                if error is None:
                    done += 1
                else:
                    log.info("alert delivery failed", event_id=attempt.event_id, attempt=attempt.attempts,
                             status=status, error=error)
        self.delivered += done
        return done


async def alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the alert loop, in database mode when [alerts] enabled."""
    cfg = app[keys.CONFIG]
    db = app.get(keys.PG)
    if db is None or not cfg.alerts.enabled:
        yield
        return
    service = AlertService(db, cfg.alerts, cfg.env(cfg.alerts.secret_env))
    service.start()
    app[keys.ALERTS] = service
    yield
    await service.close()
