"""One uvloop worker process: serve the app on the inherited socket, then drain.

Lifecycle: start -> ``R`` on the notify pipe -> ``.`` every half ping period
-> on SIGTERM (or SIGINT, or the supervisor gone):

1. mark the app draining: every response from now on says
   ``Connection: close``, so keep-alive clients retire their connections
   themselves instead of racing a close;
2. stop accepting: close this worker's copy of the listening socket (the
   kernel's queue stays with the supervisor and the other workers);
3. give keep-alive clients ``RETIRE_SECONDS`` to get that answer, then
   ``runner.cleanup()``: close idle connections, wait for in-flight requests
   and streams up to ``server.drain_seconds`` in all, cancel the rest, run
   the cleanup contexts (tracked tasks drain, usage flushes, pools close);
4. ``S`` on the pipe, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
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
from gateway.observability import multiproc
from gateway.server.protocol import GatewayRunner

READY, ALIVE, STOPPED = b"R", b".", b"S"
RETIRE_SECONDS = 1.0  # at most; never more than a quarter of the grace period


class Heartbeat:
    """The notify pipe to the supervisor; a broken pipe means the supervisor is gone."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.parent = os.getppid()
        if fd is not None:
            os.set_blocking(fd, False)  # never block the loop on a stopped supervisor

    def send(self, msg: bytes) -> bool:
        """Write ``msg``; False once the supervisor is gone."""
        if self.fd is not None:
            try:
                os.write(self.fd, msg)
            except BrokenPipeError:
                return False
            except BlockingIOError:  # a full pipe: the supervisor is alive but slow
                pass
        return os.getppid() == self.parent


async def serve(cfg: Config, sock: socket.socket, heartbeat: Heartbeat, index: int) -> None:
    log = structlog.get_logger("worker")
    loop = asyncio.get_running_loop()
    grace = cfg.server.drain_seconds
    retire = min(RETIRE_SECONDS, grace / 4)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(cfg)
    runner = GatewayRunner(
        app,
        access_log=None,  # our middleware logs one redacted line per request
        handler_cancellation=True,  # a client that goes away cancels its upstream call
        shutdown_timeout=grace - retire,  # in-flight requests get the whole grace period in all
    )
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=cfg.server.backlog)
    await site.start()
    # What start-up made (modules, config, tables, pools) lives as long as the worker: out of the
    # collector's sight, so that an occasional full collection walks only what requests made.
    gc.collect()
    gc.freeze()
    log.info("worker serving", index=index, pid=os.getpid())
    interval = cfg.server.worker_ping_seconds / 2
    alive = heartbeat.send(READY)
    while alive and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        alive = heartbeat.send(ALIVE)
    if not alive:
        log.warning("supervisor gone; draining", index=index)
    open_connections = len(runner.server.connections) if runner.server is not None else 0
    log.info("worker draining", index=index, grace_s=grace, connections=open_connections)
    started = loop.time()
    await drain(app, runner, site, retire)
    # Done: a late SIGTERM (the supervisor's after systemd's, say) must not turn exit 0 into death by signal.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    heartbeat.send(STOPPED)
    log.info("worker stopped", index=index, drain_s=round(loop.time() - started, 3))


async def drain(app: web.Application, runner: web.AppRunner, site: web.BaseSite, retire: float) -> None:
    app[keys.DRAINING][0] = True
    await site.stop()  # closes our copy of the listening socket: no new connection comes here
    server = runner.server
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retire
    # aiohttp has no event for "the last connection closed": poll it.
    while server is not None and server.connections and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await runner.cleanup()


def _ignore_group_signals() -> None:
    """HUP and TTIN/TTOU are the supervisor's (a terminal may send them to the whole group)."""
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)


def run(cfg: Config, fd: int, notify_fd: int | None, index: int) -> None:
    _ignore_group_signals()
    multiproc.pin_pid()
    gwlog.configure(cfg.log.level, worker=index)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    uvloop.run(serve(cfg, sock, Heartbeat(notify_fd), index))
