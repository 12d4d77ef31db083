"""The supervisor's side of multi-process metrics (prometheus-client multiprocess mode).

Each worker writes its metric values to mmap files named by its pid in one
directory, ``PROMETHEUS_MULTIPROC_DIR``; ``GET /metrics`` in any worker sums
them.  prometheus-client picks its value backend when it is first imported,
so the variable must be in the environment before a worker starts: the
supervisor calls ``prepare()`` before it spawns anyone.

When a worker exits, ``worker_exited(pid)`` drops its live gauges (in-flight
requests, circuit states) and folds its counters and histograms into one
``*_archive.db`` file per type, so totals never go backwards and the number
of files stays bounded however often workers are replaced or rolled.  Folding
and collecting hold an flock on ``.lock`` (exclusive / shared) so that no
scrape sees a worker's counts twice or not at all.

Nothing here imports prometheus_client at module level: the supervisor
imports this module before the variable is set.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator, MutableMapping

ENV = "PROMETHEUS_MULTIPROC_DIR"
_LOCK = ".lock"
_FOLDED_TYPES = ("counter", "histogram", "summary")
_CREATED_MARK = ".created-by-gateway"


def prepare(environ: MutableMapping[str, str]) -> str:
    """Make the directory and put it in ``environ`` (the workers' environment).

    The directory comes from ``environ`` when set (its old ``*.db`` files, from
    a previous run, are removed) or is a fresh temporary one.
    """
    path = environ.get(ENV, "")
    if path:
        os.makedirs(path, mode=0o700, exist_ok=True)
        for f in glob.glob(os.path.join(path, "*.db")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
    else:
        base = environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        path = tempfile.mkdtemp(prefix="llm-gateway-metrics-", dir=base)
        open(os.path.join(path, _CREATED_MARK), "w").close()
        environ[ENV] = path
    return path


def pin_pid() -> None:
    """In a worker, before any metric exists: its values ask for the pid once, not on every update.

    prometheus-client's multiprocess values check ``os.getpid()`` on each ``inc``/``set``
    (a fork would need new files): a syscall per value of every one-second flush, a few
    hundred a second.  A worker is started by exec, never forked, so its pid is fixed.
    """
    if not os.environ.get(ENV):
        return
    import prometheus_client.values as values

    pid = os.getpid()
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: pid)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def locked(path: str, exclusive: bool) -> Iterator[None]:
    fd = os.open(os.path.join(path, _LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def worker_exited(pid: int, path: str) -> None:
    """Drop a dead worker's gauges; fold its counters and histograms into the archive."""
    if not os.path.isdir(path):
        return
    from prometheus_client.mmap_dict import MmapedDict

    with locked(path, exclusive=True):
        for f in glob.glob(os.path.join(path, f"gauge_*_{pid}.db")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
        for typ in _FOLDED_TYPES:
            dead = os.path.join(path, f"{typ}_{pid}.db")
            if not os.path.exists(dead):
                continue
            archive = os.path.join(path, f"{typ}_archive.db")
            totals: dict[str, tuple[float, float]] = {}
            for f in (archive, dead):
                if not os.path.exists(f):
                    continue
                for key, value, ts, _ in MmapedDict.read_all_values_from_file(f):  # type: ignore[no-untyped-call]
                    old, _old_ts = totals.get(key, (0.0, 0.0))
                    totals[key] = (old + value, ts)
            tmp = os.path.join(path, f"{typ}_archive.tmp")
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            out = MmapedDict(tmp)  # type: ignore[no-untyped-call]
            try:
                for key, (value, ts) in totals.items():
                    out.write_value(key, value, ts)  # type: ignore[no-untyped-call]
            finally:
                out.close()  # type: ignore[no-untyped-call]
            os.replace(tmp, archive)
            os.remove(dead)


def cleanup(path: str) -> None:
    """At supervisor exit: remove the directory if ``prepare`` created it."""
    if os.path.exists(os.path.join(path, _CREATED_MARK)):
        shutil.rmtree(path, ignore_errors=True)
