"""The supervisor: bind once, run N workers, replace the dead, drain, roll.

Like uvicorn's multiprocess supervisor, signal handlers only queue the signal;
the main loop dispatches ``handle_<sig>()``.  Workers are separate
interpreters (``python -m gateway worker``) that inherit the listening socket,
so a worker that closes its copy while draining drops no queued connection.
Each worker writes to a notify pipe: ``R`` when ready, ``.`` as a heartbeat,
``S`` when stopped; a worker silent for too long is killed and replaced.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import structlog

from gateway.config import Config, ConfigError, load
from gateway.observability import multiproc

log = structlog.get_logger("supervisor")


def _notifier() -> object | None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    import sdnotify

    notifier: object = sdnotify.SystemdNotifier()
    return notifier


def sd_notify(state: str) -> None:
    n = _notifier()
    if n is not None:
        n.notify(state)  # type: ignore[attr-defined]


@dataclass(slots=True)
class Child:
    index: int
    proc: subprocess.Popen[bytes]
    read_fd: int
    generation: int
    started: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic)
    ready: bool = False
    stopping: bool = False


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, cfg: Config, config_path: str, workers: int | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.n = workers or cfg.server.workers or os.cpu_count() or 1
        self.sock = bind_socket(cfg.server.host, cfg.server.port, cfg.server.backlog)
        self.children: list[Child] = []
        self.generation = 0
        self.signals: list[int] = []
        self.should_exit = False
        self.mock: subprocess.Popen[bytes] | None = None

    # -- processes -------------------------------------------------------------

    def spawn(self, index: int) -> Child:
        r, w = os.pipe()
        os.set_blocking(r, False)
        cmd = [
            sys.executable, "-m", "gateway", "worker",
            "--config", self.config_path,
            "--fd", str(self.sock.fileno()),
            "--notify-fd", str(w),
            "--index", str(index),
        ]
        proc = subprocess.Popen(cmd, pass_fds=(self.sock.fileno(), w))
        os.close(w)
        child = Child(index, proc, r, self.generation)
        self.children.append(child)
        log.info("worker started", index=index, pid=proc.pid, generation=self.generation)
        return child

    def start_mock(self) -> None:
        if not self.cfg.mock_upstream.enabled:
            return
        cmd = [sys.executable, "-m", "gateway", "mock-upstream", "--config", self.config_path]
        self.mock = subprocess.Popen(cmd)

    def read_beats(self) -> None:
        now = time.monotonic()
        for c in self.children:
            try:
                data = os.read(c.read_fd, 4096)
            except BlockingIOError:
                continue
            except OSError:
                continue
            if data:
                c.last_beat = now
                if b"R" in data:
                    c.ready = True

    def wait_ready(self, kids: list[Child], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_beats()
            if all(c.ready for c in kids):
                return True
            if any(c.proc.poll() is not None for c in kids):
                return False
            time.sleep(0.02)
        return False

    def reap(self) -> None:
        """Replace dead workers of the current generation; forget stopped ones."""
        hung_after = max(3 * self.cfg.server.worker_ping_seconds, 5.0)
        now = time.monotonic()
        for c in list(self.children):
            code = c.proc.poll()
            if code is None and c.ready and not c.stopping and now - c.last_beat > hung_after:
                log.warning("worker hung; killing", index=c.index, pid=c.proc.pid)
                c.proc.kill()
                code = c.proc.wait()
            if code is None:
                continue
            self.children.remove(c)
            multiproc.worker_exited(c.proc.pid)
            os.close(c.read_fd)
            if c.stopping or self.should_exit or c.generation != self.generation:
                continue
            log.warning("worker died; replacing", index=c.index, pid=c.proc.pid, code=code)
            self.spawn(c.index)
        if self.mock is not None and self.mock.poll() is not None and not self.should_exit:
            log.warning("mock upstream died; restarting", code=self.mock.returncode)
            self.start_mock()

    def stop_children(self, kids: list[Child]) -> None:
        for c in kids:
            c.stopping = True
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)

    # -- signals -------------------------------------------------------------------

    def _queue(self, sig: int, frame: object) -> None:
        self.signals.append(sig)

    def handle_term(self) -> None:
        self.should_exit = True

    handle_int = handle_term

    def handle_hup(self) -> None:
        """Roll to a new configuration with no failed request.

        New workers start on the same socket with the new config; once all are
        ready the old ones drain.  A bad file keeps the old workers running.
        """
        try:
            cfg = load(self.config_path)
        except ConfigError as exc:
            log.error("reload refused: invalid configuration", errors=exc.errors)
            return
        if (cfg.server.host, cfg.server.port) != (self.cfg.server.host, self.cfg.server.port):
            log.warning("reload: a new listen address needs a restart; keeping the old one")
        sd_notify("RELOADING=1")
        old = [c for c in self.children if not c.stopping]
        self.cfg = cfg
        self.generation += 1
        new = [self.spawn(i) for i in range(self.n)]
        if not self.wait_ready(new, timeout=30):
            log.error("reload failed: new workers not ready; keeping the old ones")
            self.stop_children(new)
            self.generation -= 1
            sd_notify("READY=1")
            return
        self.stop_children(old)
        log.info("reloaded", generation=self.generation)
        sd_notify("READY=1")

    def handle_ttin(self) -> None:
        self.n += 1
        self.spawn(self.n - 1)

    # -- main loop -------------------------------------------------------------------

    def run(self) -> int:
        multiproc.prepare()  # before any worker imports prometheus_client
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN):
            signal.signal(sig, self._queue)
        self.start_mock()
        kids = [self.spawn(i) for i in range(self.n)]
        if not self.wait_ready(kids, timeout=60):
            log.error("workers failed to start")
            self.should_exit = True
        else:
            log.info(
                "gateway serving", host=self.cfg.server.host, port=self.sock.getsockname()[1], workers=self.n
            )
            sd_notify("READY=1")
        while not self.should_exit:
            while self.signals:
                signum = self.signals.pop(0)
                name = signal.Signals(signum).name.lower().removeprefix("sig")
                getattr(self, f"handle_{name}")()
            self.read_beats()
            self.reap()
            time.sleep(0.05)
        return self.shutdown()

    def shutdown(self) -> int:
        sd_notify("STOPPING=1")
        log.info("draining", workers=len(self.children), grace_s=self.cfg.server.drain_seconds)
        self.stop_children(self.children)
        deadline = time.monotonic() + self.cfg.server.drain_seconds + 10
        for c in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                c.proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                log.warning("worker did not drain in time; killing", pid=c.proc.pid)
                c.proc.kill()
                c.proc.wait()
        if self.mock is not None:
            self.mock.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.mock.wait(timeout=5)
        self.sock.close()
        multiproc.cleanup()
        log.info("stopped")
        return 0
