"""The Postgres pool: lazy, outage-tolerant, with short timeouts.

The pool holds no connection at start (``min_size=0``), so a worker starts
even when Postgres is down; each ``connection()`` opens or reuses one and
turns every connectivity failure into ``DatabaseUnavailable``, which callers
map to 503.  When Postgres comes back the next call simply succeeds.

At start the schema is checked: a database that lacks migrations stops the
worker with a message to run ``llm-gateway migrate``.  If Postgres is
unreachable at start the check runs in the background once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import structlog
from aiohttp import web

from gateway import keys, tasks
from gateway.config import Config
from gateway.stores.migrate import SchemaOutdated, check_schema

log = structlog.get_logger("postgres")

# Everything that means "cannot talk to Postgres right now" (not a SQL error).
CONNECTIVITY_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    # The client side of a connection the server just dropped ("not connected", a protocol left in a
    # failed state): a pooled connection killed under us (pg_terminate_backend, failover), not an SQL error.
    asyncpg.exceptions.InternalClientError,
)


class DatabaseUnavailable(Exception):
    """Postgres is unreachable, too slow, or its schema is not usable."""


def describe_target(dsn: str) -> str:
    """``user@host:port/database`` of a Postgres URL for messages: never the password."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(dsn)
        hosts = parts.netloc.rpartition("@")[2] or ",".join(parse_qs(parts.query).get("host", [])) or "localhost"
        user = parts.username or ""
    except ValueError:
        return "(unparsable database URL)"
    return f"{user + '@' if user else ''}{hosts}{parts.path or ''}"


def unavailable_message(dsn: str, exc: BaseException) -> str:
    """Where we tried and why it failed (the cause's own words, password removed if it ever appears)."""
    from urllib.parse import urlsplit

    cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) and exc.__cause__ is not None else exc
    text = str(cause) or "no detail"
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return f"cannot use Postgres at {describe_target(dsn)}: {type(cause).__name__}: {text}"


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("jsonb", "json"):
        await conn.set_type_codec(typ, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
                                  schema="pg_catalog")


class Database:
    """A pool of connections plus the state of the schema check."""

    def __init__(self, dsn: str, *, pool_max: int = 10, timeout_s: float = 0.5,
                 migrations_dir: Path | None = None) -> None:
        self.dsn = dsn
        self.pool_max = pool_max
        self.timeout_s = timeout_s  # per statement on the request path
        self.migrations_dir = migrations_dir
        self.pool: asyncpg.Pool | None = None
        self.schema_error: str | None = None
        self.schema_checked = False
        self._checker: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> Database:
        return cls(cfg.database_url, pool_max=cfg.database.pool_max, timeout_s=cfg.database.timeout_ms / 1000)

    async def start(self, *, check_timeout_s: float = 5.0) -> None:
        """Create the pool and check the schema; raise SchemaOutdated if migrations are missing."""
        self.pool = await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=self.pool_max,
            timeout=2.0,  # connect timeout
            command_timeout=30.0,  # an upper bound; request-path calls pass shorter ones
            max_inactive_connection_lifetime=60.0,
            init=_init_connection,
        )
        try:
            await asyncio.wait_for(self._check_schema(), timeout=check_timeout_s)
        except SchemaOutdated:
            await self.close()
            raise
        except (DatabaseUnavailable, TimeoutError) as exc:
            log.warning("postgres unreachable at start; cached and config keys only until it is back",
                        reason=unavailable_message(self.dsn, exc))
            self._checker = asyncio.get_running_loop().create_task(self._check_until_done())

    async def _check_schema(self) -> None:
        async with self.connection(timeout=2.0, check=False) as conn:
            try:
                await check_schema(conn, self.migrations_dir)
            except SchemaOutdated as exc:
                self.schema_error = str(exc)
                raise
        self.schema_checked = True
        self.schema_error = None

    async def _check_until_done(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._check_schema()
                log.info("postgres reachable; schema is current")
                return
            except SchemaOutdated as exc:
                log.error("postgres schema outdated", error=str(exc))
                return
            except (DatabaseUnavailable, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        await tasks.stop(self._checker)
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5.0)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float | None = None, *, check: bool = True) -> AsyncIterator[Any]:
        """A pooled connection; connectivity failures become DatabaseUnavailable."""
        if self.pool is None:
            raise DatabaseUnavailable("the database pool is closed")
        if check and self.schema_error is not None:
            raise DatabaseUnavailable(self.schema_error)
        try:
            conn = await self.pool.acquire(timeout=timeout or max(self.timeout_s, 1.0))
        except (*CONNECTIVITY_ERRORS, asyncpg.PostgresError) as exc:
            # Getting a connection can open one, and a server that refuses it with an SQL state
            # ("database is not accepting connections", authentication, ...) is unavailable too.
            raise DatabaseUnavailable(f"postgres unavailable: {type(exc).__name__}") from exc
        try:
            yield conn
        except CONNECTIVITY_ERRORS as exc:
            raise DatabaseUnavailable(f"postgres unavailable: {type(exc).__name__}") from exc
        finally:
            await self.pool.release(conn)

    @contextlib.asynccontextmanager
    async def transaction(self, timeout: float | None = None) -> AsyncIterator[Any]:
        async with self.connection(timeout) as conn, conn.transaction():
            yield conn


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the pool under keys.PG (database mode only)."""
    cfg = app[keys.CONFIG]
    if cfg.standalone:
        yield
        return
    db = Database.from_config(cfg)
    try:
        await db.start()
    except SchemaOutdated as exc:
        log.error("refusing to start", error=str(exc))
        raise
    app[keys.PG] = db
    yield
    await db.close()
