"""The Redis connection behind shared limits: single, Sentinel or Cluster.

``redis.topology`` picks the client; the URL comes from the environment
variable named by ``redis.url_env``.  Every call has a short timeout
(``redis.timeout_ms``, for connecting and for each reply) and no client-side
retry: a dead or hung Redis costs a caller one timeout, then the store is
marked down and callers take their degraded path without touching Redis
until a background probe sees it answer again (every ``retry_seconds``).

The down/up transition is logged once each way and counted (``errors``,
``outages``) for the metrics and readiness code to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway import tasks
from gateway.config import RedisConfig
from gateway.stores.resp import PipelinedRedis

log = structlog.get_logger("redis")

RedisClient = aioredis.Redis | RedisCluster
# What a failed call raises: redis errors, socket errors, our own timeouts.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _sentinel_hosts(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis+sentinel://[:password@]h1:26379,h2:26379/0`` -> hosts, master kwargs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    kwargs: dict[str, Any] = {}
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        if user:
            kwargs["username"] = unquote(user)
        if password:
            kwargs["password"] = unquote(password)
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        hosts.append((host or item, int(port) if host and port else 26379))
    db = parts.path.strip("/")
    if db:
        kwargs["db"] = int(db)
    return hosts, kwargs


def create_client(cfg: RedisConfig, url: str) -> RedisClient:
    """The client for ``cfg.topology``, with short timeouts and no retries."""
    timeout = cfg.timeout_ms / 1000.0
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _no_retry(),
        "health_check_interval": 0,
        "driver_info": None,  # no CLIENT SETINFO round trips on every new connection
    }
    if cfg.topology == "cluster":
        return RedisCluster.from_url(
            url, max_connections=1024, **common
        )
    if cfg.topology == "sentinel":
        hosts, master_kwargs = _sentinel_hosts(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout}, **common
        )
        client: aioredis.Redis = sentinel.master_for(cfg.sentinel_master, **master_kwargs)
        return client
    return aioredis.Redis.from_url(url, **common)


class RedisStore:
    """One client plus its health: ``healthy``, ``errors``, ``outages``.

    Callers use ``client`` while ``healthy``; on a failed call they report it
    with ``failed(exc)``.  ``on_recover`` callbacks run (in order) when a probe
    sees Redis answer again, before ``healthy`` turns true, so that whatever
    must happen first (pushing spend kept during the outage) does.
    """

    def __init__(
        self,
        cfg: RedisConfig,
        url: str,
        *,
        client: RedisClient | None = None,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client: RedisClient = client if client is not None else create_client(cfg, url)
        self.timeout = cfg.timeout_ms / 1000.0
        # The hot path's pipelined connection (single Redis over TCP); redis-py for the rest.
        self.fast: PipelinedRedis | None = (
            PipelinedRedis(url, self.timeout)
            if client is None and cfg.topology == "single" and PipelinedRedis.supports(url)
            else None
        )
        self.healthy = True
        self.errors = 0  # failed calls, all time
        self.outages = 0  # healthy -> down transitions
        self.down_since: float | None = None
        self.last_error = ""  # exception class name only: a URL may hold a password
        self._on_state = on_state
        self._recover: list[Callable[[], Awaitable[None]]] = []
        self._probe: asyncio.Task[None] | None = None
        self._closed = False

    def on_recover(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._recover.append(callback)

    def failed(self, exc: BaseException) -> None:
        """A call failed: count it; the first failure of an outage logs and starts the probe."""
        self.errors += 1
        self.last_error = type(exc).__name__
        if not self.healthy or self._closed:
            return
        self.healthy = False
        self.outages += 1
        self.down_since = time.monotonic()
        log.warning("redis unreachable; limits degrade", mode=self.cfg.failure_mode, error=self.last_error)
        if self._on_state is not None:
            self._on_state(True)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def ping(self) -> None:
        async with asyncio.timeout(self.timeout):
            if self.fast is not None:
                await self.fast.call("PING")
            else:
                await self.client.ping()

    async def _probe_until_up(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.cfg.retry_seconds)
            try:
                await self.ping()
                for callback in self._recover:
                    await callback()
            except REDIS_ERRORS as exc:
                self.errors += 1
                self.last_error = type(exc).__name__
                continue
            down_s = time.monotonic() - (self.down_since or time.monotonic())
            self.healthy = True
            self.down_since = None
            log.info("redis reachable again; shared limits resume", down_s=round(down_s, 3))
            if self._on_state is not None:
                self._on_state(False)
            return

    async def close(self) -> None:
        self._closed = True
        await tasks.stop(self._probe)
        if self.fast is not None:
            await self.fast.close()
        with contextlib.suppress(*REDIS_ERRORS):
            await self.client.aclose()
        # A Sentinel-discovered master: its Sentinel connections are the manager's to close.
        manager = getattr(getattr(self.client, "connection_pool", None), "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            with contextlib.suppress(*REDIS_ERRORS):
                await sentinel.aclose()
