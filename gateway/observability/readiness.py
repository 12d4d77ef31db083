"""Readiness: GET /readyz reports Postgres, Redis and the upstream circuits.

200 when every configured dependency answers and at least one upstream
circuit lets requests through; 503 otherwise, and always while the worker
drains (SIGTERM sets ``keys.DRAINING``), so a load balancer stops sending new
requests before the worker goes away.  Liveness is ``/healthz``, which never
touches a dependency.

Probes run at most every ``_CACHE_S`` per worker whatever the probe rate,
each bounded by a short timeout, over one lazily opened connection of their
own (or the Postgres store's pool when it runs).  Errors are reported by
class name only: a DSN may hold a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from gateway import keys
from gateway.accounting import set_aside
from gateway.accounting.ledger import LedgerWriter, db_fingerprint
from gateway.accounting.sink import UsageSink
from gateway.config import Config
from gateway.providers.cloud import credential_checks
from gateway.resilience.breaker import State

_CACHE_S = 0.5
_DRAINING = b'{"status":"draining"}'
_MIN_TIMEOUT_S = 0.25
_MAX_TIMEOUT_S = 1.0


def _timeout(ms: int) -> float:
    return min(_MAX_TIMEOUT_S, max(_MIN_TIMEOUT_S, 2 * ms / 1000.0))


class Readiness:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._pg_timeout = _timeout(cfg.database.timeout_ms)
        self._redis_timeout = _timeout(cfg.redis.timeout_ms)
        self._pg_conn: Any = None
        self._redis: Any = None
        self._lock = asyncio.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    async def close(self) -> None:
        if self._pg_conn is not None:
            conn, self._pg_conn = self._pg_conn, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=1.0)
        if self._redis is not None:
            client, self._redis = self._redis, None
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- probes -------------------------------------------------------------------

    async def _postgres(self, app: web.Application) -> dict[str, Any]:
        if not self.cfg.database_url:
            return {"status": "disabled"}
        t0 = time.perf_counter()
        try:
            db = app.get(keys.PG)
            if db is not None:
                async with db.connection(timeout=self._pg_timeout, check=False) as conn:
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), self._pg_timeout)
            else:
                await asyncio.wait_for(self._own_pg_ping(), self._pg_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means "down"
            await self._drop_pg()
            return {"status": "down", "error": type(exc).__name__}
        return {"status": "ok", "ms": round((time.perf_counter() - t0) * 1000, 2)}

    async def _own_pg_ping(self) -> None:
        import asyncpg

        if self._pg_conn is None or self._pg_conn.is_closed():
            self._pg_conn = await asyncpg.connect(self.cfg.database_url, timeout=self._pg_timeout)
        await self._pg_conn.fetchval("SELECT 1")

    async def _drop_pg(self) -> None:
        if self._pg_conn is not None:
            conn, self._pg_conn = self._pg_conn, None
            conn.terminate()

    async def _redis_probe(self, app: web.Application) -> dict[str, Any]:
        url = self.cfg.redis_url
        if not url:
            return {"status": "disabled"}
        t0 = time.perf_counter()
        try:
            store = app.get(keys.REDIS)
            client = store.client if store is not None else self._own_redis(url)
            await asyncio.wait_for(client.ping(), self._redis_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means "down"
            return {"status": "down", "error": type(exc).__name__}
        return {"status": "ok", "ms": round((time.perf_counter() - t0) * 1000, 2)}

    def _own_redis(self, url: str) -> Any:
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(
                url, socket_timeout=self._redis_timeout, socket_connect_timeout=self._redis_timeout,
                max_connections=2, retry_on_timeout=False,
            )
        return self._redis

    @staticmethod
    def _circuits(app: web.Application) -> dict[str, Any]:
        deployments = app[keys.ROUTER].upstreams
        states: dict[str, str] = {}
        open_now = 0
        for name, dep in deployments.items():
            b = dep.breaker
            if b.state is State.OPEN and b.retry_after() > 0:
                states[name] = "open"
                open_now += 1
            else:
                states[name] = "half_open" if b.state is not State.CLOSED else "closed"
        # Unready only when no upstream at all can take a request.
        status = "down" if deployments and open_now == len(deployments) else "ok"
        return {"status": status, "upstreams": states}

    # -- the answer ------------------------------------------------------------------

    async def check(self, app: web.Application) -> dict[str, Any]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < _CACHE_S:
            return self._cached[1]
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < _CACHE_S:
                return self._cached[1]
            pg, rd = await asyncio.gather(self._postgres(app), self._redis_probe(app))
            checks = {"postgres": pg, "redis": rd, "circuits": self._circuits(app)}
            creds = credential_checks(app)
            if creds is not None:
                checks["credentials"] = creds  # cloud upstreams only: each one's credential, or why not
            ledger = ledger_check(app.get(keys.USAGE))
            if ledger is not None:
                checks["ledger"] = ledger
            metrics = app.get(keys.METRICS)
            # The Redis store reports its own outages to the metrics; Postgres has no such state.
            if metrics is not None and pg["status"] != "disabled":
                metrics.set_degraded("postgres", pg["status"] == "down")
            self._cached = (time.monotonic(), checks)
            return checks


def ledger_check(sink: UsageSink | None) -> dict[str, Any] | None:
    """The usage ledger writer: degraded while refused records are set aside or batches cannot be written."""
    if not isinstance(sink, LedgerWriter):
        return None
    files = set_aside.files(sink.dir, db_fingerprint(sink.db.dsn))
    if files:
        return {
            "status": "degraded",
            "reason": f"usage records refused by postgres are set aside in {sink.dir}: inspect, then remove "
                      "or replay them (README: the usage ledger)",
            "set_aside_files": sorted(f.name for f in files),
        }
    if sink.last_outage:
        return {"status": "degraded", "reason": f"usage journaled, not yet written: {sink.last_outage}",
                "pending": sink.pending}
    return {"status": "ok"}


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    headers = {"cache-control": "no-store"}
    if app[keys.DRAINING][0]:
        return web.Response(status=503, body=_DRAINING, content_type="application/json", headers=headers)
    checks = await app[keys.READINESS].check(app)
    ready = all(c["status"] != "down" for c in checks.values())
    # Degraded: still serving (200), but an operator must look (the check says why).
    degraded = any(c["status"] == "degraded" for c in checks.values())
    status = "unready" if not ready else "degraded" if degraded else "ready"
    body: dict[str, Any] = {"status": status, "checks": checks}
    return web.Response(
        status=200 if ready else 503, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


async def readiness_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the probe connections, closed at shutdown."""
    readiness = Readiness(app[keys.CONFIG])
    app[keys.READINESS] = readiness
    yield
    await readiness.close()
