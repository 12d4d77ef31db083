"""The supervisor: bind once, run N workers, replace the dead and the hung, drain on TERM, roll on HUP.

Shaped like uvicorn's ``supervisors/multiprocess.py``: signal handlers only
queue the signal (``signal.set_wakeup_fd`` wakes the loop); the main loop
dispatches ``handle_<sig>()``.  Workers are fresh interpreters (``python -m
gateway worker``) that inherit the one listening socket, so all of them share
one accept queue: a worker that closes its copy while draining drops no queued
connection, its siblings or the next generation accept it.  (With
SO_REUSEPORT each worker would own a queue, and Linux drops a closed queue's
connections.)

Each worker writes to its own notify pipe: ``R`` once serving, ``.`` every
half ``worker_ping_seconds``, ``S`` when drained.  A ready worker silent for
three ping periods is hung (blocked event loop, SIGSTOP, deadlock) and is
killed; a worker that dies is replaced, with a back-off when it keeps dying
young.  Every worker of a generation runs the configuration text the
supervisor validated for it (a memfd), so a replacement never picks up a file
edited since.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from gateway.config import Config, ConfigError, parse
from gateway.observability import multiproc

log = structlog.get_logger("supervisor")

KILL_MARGIN = 10.0  # past drain_seconds, a stopping worker gets SIGKILL (cleanup flushes, pools close)
TICK = 0.5  # the main loop wakes at least this often (timeouts, respawns, watchdog)
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
# What systemd hands the main process only; children must not talk to it.
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def default_workers() -> int:
    """One per core this process may run on (taskset and cpusets included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class SystemdNotifier:
    """sd_notify(3) to ``$NOTIFY_SOCKET`` when systemd gave one; a no-op otherwise."""

    def __init__(self, environ: dict[str, str]) -> None:
        self._sock: Any = None
        self._watchdog_s: float | None = None
        self._next_watchdog = 0.0
        if environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._sock = sdnotify.SystemdNotifier()
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self._watchdog_s = int(usec) / 1e6 / 2

    def notify(self, *lines: str) -> None:
        if self._sock is not None:
            self._sock.notify("\n".join(lines))

    def reloading(self) -> None:
        # Type=notify-reload wants the monotonic time with RELOADING=1.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def watchdog(self, now: float) -> None:
        if self._watchdog_s is not None and now >= self._next_watchdog:
            self._next_watchdog = now + self._watchdog_s
            self.notify("WATCHDOG=1")


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the supervisor dies.

    So a supervisor killed with SIGKILL leaves no orphans: its workers drain
    and exit (they also notice the broken notify pipe).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl: the signal will never come
            os._exit(0)

    return preexec


@dataclass(slots=True, eq=False)
class WorkerProcess:
    index: int
    generation: int
    proc: subprocess.Popen[bytes]
    beat_fd: int
    started: float
    last_beat: float
    ready: bool = False
    stop_deadline: float | None = None  # set once told to stop
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stopping(self) -> bool:
        return self.stop_deadline is not None


@dataclass(slots=True, eq=False)
class Generation:
    """A configuration and the workers that run it."""

    number: int
    cfg: Config
    config_fd: int  # memfd holding the validated TOML text; -1 when unavailable
    size: int  # how many workers it should have


@dataclass(slots=True, eq=False)
class Rollout:
    """A generation starting; the workers of older generations drain once all of it is ready."""

    generation: Generation
    workers: list[WorkerProcess]
    deadline: float
    initial: bool


@dataclass(slots=True)
class Respawns:
    """When a dead worker's slot may start again: at once, or later if it keeps dying young."""

    at: dict[int, float] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)

    def schedule(self, w: WorkerProcess, now: float) -> float:
        young = not w.ready or now - w.started < 5.0
        n = self.failures.get(w.index, 0) + 1 if young else 0
        self.failures[w.index] = n
        delay = 0.0 if n == 0 else min(0.25 * 2 ** (n - 1), 10.0)
        self.at[w.index] = now + delay
        return delay


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        config_path: str,
        *,
        workers: int | None = None,
        port: int | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        env = dict(os.environ if environ is None else environ)
        self.config_path = str(Path(config_path).resolve())
        self.cli_workers = workers
        self.cli_port = port
        self.notifier = SystemdNotifier(env)
        self.child_env = {k: v for k, v in env.items() if k not in _SYSTEMD_ENV}
        # Before any worker imports prometheus_client: its metric files' directory.
        self.metrics_dir = multiproc.prepare(self.child_env)
        self.preexec = _die_with_parent()
        cfg = self._effective(cfg)
        self.sock = bind_socket(cfg.server.host, cfg.server.port, cfg.server.backlog)
        self.address = (cfg.server.host, cfg.server.port)
        self.current = self._generation(0, cfg, Path(self.config_path).read_text())
        self.workers: list[WorkerProcess] = []
        self.rollout: Rollout | None = None
        self.reload_again = False
        self.respawns = Respawns()
        self.mock: subprocess.Popen[bytes] | None = None
        self.signals: deque[int] = deque()
        self.should_exit = False
        self.exit_code = 0
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    # -- configuration ---------------------------------------------------------

    def _effective(self, cfg: Config) -> Config:
        if self.cli_port is not None:
            cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, port=self.cli_port))
        return cfg

    def _generation(self, number: int, cfg: Config, text: str) -> Generation:
        size = self.cli_workers or cfg.server.workers or default_workers()
        fd = -1
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create(f"gateway-config-{number}")
            os.write(fd, text.encode())
        return Generation(number, cfg, fd, size)

    def _load(self) -> tuple[Config, str]:
        """Read and validate the file the way a worker will use it (prices included)."""
        from gateway.accounting.pricing import PriceTable

        try:
            text = Path(self.config_path).read_text()
        except OSError as exc:
            raise ConfigError([f"{self.config_path}: cannot read: {exc.strerror}"]) from None
        cfg = self._effective(parse(text, source=self.config_path))
        PriceTable.load(cfg)
        return cfg, text

    # -- processes -------------------------------------------------------------

    def spawn(self, index: int, gen: Generation) -> WorkerProcess:
        r, w = os.pipe()
        os.set_blocking(r, False)
        fds = [self.sock.fileno(), w]
        cmd = [
            sys.executable, "-m", "gateway", "worker",
            "--config", self.config_path,
            "--fd", str(self.sock.fileno()),
            "--notify-fd", str(w),
            "--index", str(index),
        ]
        if gen.config_fd >= 0:
            cmd += ["--config-fd", str(gen.config_fd)]
            fds.append(gen.config_fd)
        try:
            proc = subprocess.Popen(cmd, pass_fds=fds, env=self.child_env, preexec_fn=self.preexec)
        finally:
            os.close(w)
        now = time.monotonic()
        worker = WorkerProcess(index, gen.number, proc, r, started=now, last_beat=now)
        self.workers.append(worker)
        self.selector.register(r, selectors.EVENT_READ, worker)
        log.info("worker started", index=index, pid=proc.pid, generation=gen.number)
        return worker

    def stop_worker(self, w: WorkerProcess, grace: float | None = None) -> None:
        """SIGTERM: the worker stops accepting, drains, exits; SIGKILL if it overstays."""
        if w.stopping:
            return
        grace = self.current.cfg.server.drain_seconds if grace is None else grace
        w.stop_deadline = time.monotonic() + grace + KILL_MARGIN
        with contextlib.suppress(ProcessLookupError):
            w.proc.send_signal(signal.SIGTERM)

    def start_mock(self) -> None:
        if not self.current.cfg.mock_upstream.enabled:
            return
        cmd = [sys.executable, "-m", "gateway", "mock-upstream", "--config", self.config_path]
        self.mock = subprocess.Popen(cmd, env=self.child_env, preexec_fn=self.preexec)
        log.info("mock upstream started", pid=self.mock.pid, port=self.current.cfg.mock_upstream.port)

    def wait_mock_listening(self, timeout: float = 10.0) -> None:
        """The demo routes point at the mock: announce readiness only once it answers."""
        if self.mock is None:
            return
        mock = self.current.cfg.mock_upstream
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.mock.poll() is None:
            try:
                socket.create_connection((mock.host, mock.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        log.warning("mock upstream not listening", port=mock.port, code=self.mock.poll())

    def stop_mock(self) -> None:
        if self.mock is None:
            return
        self.mock.terminate()
        try:
            self.mock.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.mock.kill()
            self.mock.wait()
        self.mock = None

    def start_generation(self, gen: Generation, *, initial: bool) -> None:
        new = [self.spawn(i, gen) for i in range(gen.size)]
        self.rollout = Rollout(gen, new, time.monotonic() + gen.cfg.server.worker_start_seconds, initial)

    # -- events ------------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        """Sleep until a beat, a signal or the timeout; record the beats."""
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 512):
                        pass
                continue
            w: WorkerProcess = key.data
            try:
                data = os.read(w.beat_fd, 512)
            except BlockingIOError:
                continue
            if not data:  # the worker closed its end: it exited; the next check reaps it
                self.selector.unregister(w.beat_fd)
                continue
            w.last_beat = time.monotonic()
            if b"R" in data and not w.ready:
                w.ready = True
                log.info("worker ready", index=w.index, pid=w.pid, generation=w.generation)

    def dispatch_signals(self) -> None:
        while self.signals:
            sig = signal.Signals(self.signals.popleft())
            getattr(self, "handle_" + sig.name.lower().removeprefix("sig"))()

    def check_workers(self) -> None:
        """Reap the exited, kill the hung and the overstaying, replace the dead."""
        now = time.monotonic()
        hung_after = 3 * self.current.cfg.server.worker_ping_seconds
        for w in list(self.workers):
            code = w.proc.poll()
            if code is None:
                if w.killed:
                    continue  # SIGKILLed: only its exit is awaited
                if w.stop_deadline is not None:
                    if now > w.stop_deadline:
                        self.kill(w, "worker did not drain in time; killing")
                elif w.ready and now - w.last_beat > hung_after:
                    self.kill(w, "worker hung; killing", silent_s=round(now - w.last_beat, 1))
                elif not w.ready and now - w.started > self.current.cfg.server.worker_start_seconds:
                    self.kill(w, "worker did not start in time; killing")
                continue
            self._forget(w)
            if w.stopping or self.should_exit:
                log.info("worker exited", index=w.index, pid=w.pid, code=code, generation=w.generation)
            elif self.rollout is not None and w in self.rollout.workers:
                self.abort_rollout(f"worker {w.index} exited with {code} before it was ready")
            elif w.generation == self.current.number and w.index < self.current.size:
                delay = self.respawns.schedule(w, now)
                log.warning("worker died; replacing", index=w.index, pid=w.pid, code=code, delay_s=delay)
        for index, at in list(self.respawns.at.items()):
            if now >= at and not self.should_exit:
                del self.respawns.at[index]
                if index < self.current.size:
                    self.spawn(index, self.current)
        if self.mock is not None and self.mock.poll() is not None and not self.should_exit:
            log.warning("mock upstream died; restarting", code=self.mock.returncode)
            self.start_mock()

    def kill(self, w: WorkerProcess, why: str, **fields: Any) -> None:
        log.warning(why, index=w.index, pid=w.pid, **fields)
        w.killed = True
        with contextlib.suppress(ProcessLookupError):
            w.proc.kill()

    def _forget(self, w: WorkerProcess) -> None:
        self.workers.remove(w)
        multiproc.worker_exited(w.pid, self.metrics_dir)
        with contextlib.suppress(KeyError):
            self.selector.unregister(w.beat_fd)
        os.close(w.beat_fd)

    def check_rollout(self) -> None:
        r = self.rollout
        if r is None:
            return
        if all(w.ready for w in r.workers):
            self.finish_rollout(r)
        elif time.monotonic() > r.deadline:
            self.abort_rollout(f"workers not ready after {r.generation.cfg.server.worker_start_seconds:g}s")

    def finish_rollout(self, r: Rollout) -> None:
        self.rollout = None
        old = self.current
        self.current = r.generation
        # Every older worker, including one that replaced a dead sibling during the rollout.
        replaced = [w for w in self.workers if w.generation != self.current.number and not w.stopping]
        for w in replaced:
            self.stop_worker(w, grace=old.cfg.server.drain_seconds)
        if old.config_fd >= 0 and old is not r.generation:
            os.close(old.config_fd)
        self.respawns = Respawns()
        cfg = self.current.cfg
        if r.initial:
            self.wait_mock_listening()
            log.info("gateway serving", host=self.address[0], port=self.sock.getsockname()[1], workers=len(r.workers),
                     pid=os.getpid())
        else:
            if cfg.mock_upstream != old.cfg.mock_upstream:
                self.stop_mock()
                self.start_mock()
                self.wait_mock_listening()
            log.info("reloaded", generation=self.current.number, workers=len(r.workers), draining=len(replaced))
        self.notifier.notify("READY=1", f"STATUS=serving on port {self.sock.getsockname()[1]} with {len(r.workers)} workers")
        if self.reload_again:
            self.reload_again = False
            self.handle_hup()

    def abort_rollout(self, reason: str) -> None:
        r = self.rollout
        assert r is not None
        self.rollout = None
        for w in r.workers:
            self.stop_worker(w, grace=0)
        if r.generation.config_fd >= 0:
            os.close(r.generation.config_fd)
        if r.initial:
            log.error("workers failed to start", reason=reason)
            self.exit_code = 1
            self.should_exit = True
            return
        log.error("reload failed; keeping the running workers", reason=reason, generation=self.current.number)
        self.notifier.notify("READY=1", "STATUS=reload failed; serving the previous configuration")

    # -- signals -----------------------------------------------------------------

    def _queue(self, sig: int, frame: object) -> None:
        self.signals.append(sig)

    def handle_term(self) -> None:
        if self.should_exit:  # a second TERM/INT: stop waiting for the drain
            log.warning("second stop signal; killing the workers")
            for w in self.workers:
                w.stop_deadline = 0.0
            return
        self.should_exit = True

    handle_int = handle_term

    def handle_hup(self) -> None:
        """Roll to the changed configuration with no failed request.

        A new generation starts on the same socket; once all of it is ready
        the old one drains.  An invalid file keeps the running workers.
        """
        if self.should_exit:
            return
        if self.rollout is not None:
            log.info("reload requested during a rollout; reloading again after it")
            self.reload_again = True
            return
        try:
            cfg, text = self._load()
        except ConfigError as exc:
            log.error("reload refused: invalid configuration; keeping the running workers",
                      path=self.config_path, errors=exc.errors)
            return
        self.notifier.reloading()
        if (cfg.server.host, cfg.server.port) != self.address:
            log.warning("reload: a new listen address takes a restart; keeping the old one", address=self.address)
        log.info("reloading", generation=self.current.number + 1)
        self.start_generation(self._generation(self.current.number + 1, cfg, text), initial=False)

    def handle_ttin(self) -> None:
        """One more worker."""
        if self.rollout is None and not self.should_exit:
            self.current.size += 1
            self.spawn(self.current.size - 1, self.current)

    def handle_ttou(self) -> None:
        """One worker fewer (never below one)."""
        if self.rollout is None and not self.should_exit and self.current.size > 1:
            self.current.size -= 1
            self.respawns.at.pop(self.current.size, None)
            for w in self.workers:
                if w.index == self.current.size and w.generation == self.current.number:
                    self.stop_worker(w)

    # -- main loop -----------------------------------------------------------------

    def run(self) -> int:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._queue)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.start_mock()
        self.start_generation(self.current, initial=True)
        while not self.should_exit:
            self.wait(TICK)
            self.dispatch_signals()
            self.check_rollout()
            self.check_workers()
            self.notifier.watchdog(time.monotonic())
        return self.shutdown()

    def shutdown(self) -> int:
        """Drain: every worker stops accepting and finishes what it has, then the supervisor exits."""
        self.notifier.notify("STOPPING=1", "STATUS=draining")
        log.info("draining", workers=len(self.workers), grace_s=self.current.cfg.server.drain_seconds)
        self.rollout = None
        for w in self.workers:
            self.stop_worker(w)
        # The workers closed (or are closing) their copies; with ours gone the
        # port refuses new connections instead of queueing them for nobody.
        self.sock.close()
        while self.workers:
            self.wait(0.1)
            self.dispatch_signals()
            self.check_workers()
            self.notifier.watchdog(time.monotonic())
        self.stop_mock()
        multiproc.cleanup(self.metrics_dir)
        log.info("stopped", code=self.exit_code)
        return self.exit_code
