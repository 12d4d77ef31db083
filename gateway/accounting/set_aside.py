"""Where usage records Postgres refused go: a file per worker in the journal directory.

``set-aside-<db>-<pid>.jsonl`` holds each refused record as a journal line
plus ``set_aside``: the SQLSTATE, error class and (cut) message.  The ledger
writer never retries them; ``/readyz`` reports the ledger degraded while any
such file of the database exists (``files``), so an operator inspects it,
fixes or drops the records, and removes it (README, "Usage and cost").
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import structlog

from gateway.accounting.ledger_errors import sqlstate
from gateway.accounting.record import UsageRecord

log = structlog.get_logger("ledger")

PREFIX = "set-aside-"
_IDS_MAX = 100_000  # request ids remembered so that a retried segment skips them
_REASON_MAX = 300  # characters of Postgres's message kept with a record


def files(journal_dir: str | Path, db: str) -> list[Path]:
    """Non-empty set-aside files of database fingerprint ``db`` in the journal directory."""
    prefix = f"{PREFIX}{db}-"
    try:
        with os.scandir(journal_dir) as it:
            return [Path(e.path) for e in it
                    if e.name.startswith(prefix) and e.name.endswith(".jsonl") and e.stat().st_size > 0]
    except OSError:
        return []


class SetAside:
    """This worker's set-aside file, and the ids it already holds."""

    def __init__(self, journal_dir: Path, db: str) -> None:
        self.path = journal_dir / f"{PREFIX}{db}-{os.getpid()}.jsonl"
        self.ids: set[str] = set()

    def add(self, rec: UsageRecord, exc: BaseException) -> None:
        """Keep a refused record and why (one ``write(2)``); logged at error either way."""
        if len(self.ids) >= _IDS_MAX:
            self.ids.clear()
        self.ids.add(rec.request_id)
        reason = {"sqlstate": sqlstate(exc), "error": type(exc).__name__, "message": str(exc)[:_REASON_MAX]}
        log.error("ledger: record refused by postgres; set aside", request_id=rec.request_id[:100],
                  file=self.path.name, **reason)
        line = orjson.dumps({**rec.to_dict(), "set_aside": reason}, default=str) + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as err:
            log.error("ledger: set-aside file unwritable; the refused record is only in this log",
                      error=err.strerror, record=line.decode(errors="replace"))
