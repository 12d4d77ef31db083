"""Where finished requests' usage goes.  ``record`` never blocks the hot path."""

from __future__ import annotations

from typing import Protocol

import structlog

from gateway.accounting.record import UsageRecord


class UsageSink(Protocol):
    # A sink with ``on_request_line = True`` has its records written on the request's
    # one log line (the middleware's), not by ``record`` (see gateway/proxy/hot.py).

    def record(self, rec: UsageRecord) -> None: ...

    async def close(self) -> None: ...


class LogSink:
    """Standalone mode: usage goes to the log, on the request's one line (``record`` for any other)."""

    on_request_line = True

    def __init__(self) -> None:
        self._log = structlog.get_logger("usage")

    def record(self, rec: UsageRecord) -> None:
        self._log.info("usage", **rec.to_dict())

    async def close(self) -> None:
        return None


class NullSink:
    """``accounting.sink = "none"``: records nothing (benchmarks measure the ledger's cost with it)."""

    on_request_line = False

    def record(self, rec: UsageRecord) -> None:
        return None

    async def close(self) -> None:
        return None
