"""One uvloop worker process: serve the app on the inherited socket.

Lifecycle: start -> tell the supervisor "ready" on the notify pipe -> send a
heartbeat every few seconds -> on SIGTERM: stop accepting (close our copy of
the listening socket; the supervisor and siblings keep theirs), let in-flight
requests and streams finish up to ``server.drain_seconds``, cancel the rest,
run cleanup (flush usage, close pools) and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

import structlog
import uvloop
from aiohttp import web

from gateway import keys
from gateway.app import create_app
from gateway.config import Config
from gateway.observability import logging as gwlog


async def serve(cfg: Config, sock: socket.socket, notify_fd: int | None, index: int) -> None:
    log = structlog.get_logger("worker")
    app = create_app(cfg)
    runner = web.AppRunner(
        app,
        access_log=None,  # our middleware logs one redacted line per request
        handler_cancellation=True,  # a client that goes away cancels its upstream call
        shutdown_timeout=cfg.server.drain_seconds,
    )
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=cfg.server.backlog)
    await site.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker ready", index=index, pid=os.getpid())

    def beat(msg: bytes) -> None:
        if notify_fd is not None:
            with contextlib.suppress(OSError):
                os.write(notify_fd, msg)

    beat(b"R")
    interval = cfg.server.worker_ping_seconds / 2
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        beat(b".")
    app[keys.DRAINING][0] = True
    log.info("worker draining", index=index, grace_s=cfg.server.drain_seconds)
    await runner.cleanup()
    beat(b"S")
    log.info("worker stopped", index=index)


def run(cfg: Config, fd: int, notify_fd: int | None, index: int) -> None:
    gwlog.configure(cfg.log.level, worker=index)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    uvloop.run(serve(cfg, sock, notify_fd, index))
