"""A LISTEN connection that reconnects by itself.

Runs on its own connection (not from the pool), pings it every few seconds
to notice a half-open socket, and calls ``on_connect`` after every
(re)connection (once LISTEN is in place) so that the owner can drop state it
may have missed notifications for while it was away, and ``on_disconnect``
as soon as it knows the connection is gone (or before the first one is up:
the owner starts out disconnected).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from gateway import tasks
from gateway.stores.postgres import CONNECTIVITY_ERRORS

log = structlog.get_logger("postgres.listen")

# Visible in pg_stat_activity, so that an operator (or a test) can tell the listener from the pool.
APPLICATION_NAME = "llm-gateway-listen"
# Generous: on a loaded host a connection can take seconds; the cache is not trusted until LISTEN is up.
CONNECT_TIMEOUT_S = 10.0


class Listener:
    def __init__(self, dsn: str, channel: str, on_message: Callable[[str], None],
                 on_connect: Callable[[], None], *, ping_seconds: float = 2.0,
                 on_disconnect: Callable[[], None] | None = None) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.ping_seconds = ping_seconds
        self.connected = asyncio.Event()
        self.connections = 0  # successful (re)connections, for tests and metrics
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await tasks.stop(self._task)
        self._task = None

    def _lost(self, stop: Callable[[], None]) -> None:
        """The connection is gone (or going): tell the owner at once, not at the next ping."""
        stop()
        if self.connected.is_set():
            self.connected.clear()
            if self.on_disconnect is not None:
                self.on_disconnect()

    def _deliver(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.on_message(payload)

    async def _run(self) -> None:
        delay = 0.1
        was_up = False
        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_S,
                                             server_settings={"application_name": APPLICATION_NAME})
            except (*CONNECTIVITY_ERRORS, asyncpg.PostgresError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(lambda _c, stop=lost.set: self._lost(stop))
                await conn.add_listener(self.channel, self._deliver)
                self.connections += 1
                self.connected.set()
                self.on_connect()
                if was_up:
                    log.info("listener reconnected", channel=self.channel)
                was_up = True
                delay = 0.1
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=self.ping_seconds)
                    if not lost.is_set():
                        await conn.execute("SELECT 1", timeout=self.ping_seconds)
            except (*CONNECTIVITY_ERRORS, asyncpg.PostgresError):
                pass
            finally:
                self._lost(lost.set)
                conn.terminate()
            log.warning("listener lost its connection; reconnecting", channel=self.channel)
