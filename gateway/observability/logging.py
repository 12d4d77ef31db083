"""structlog JSON lines on stdout: orjson renderer, cached, level-filtered.

Nothing secret ever reaches a log line: the request line carries the key's
display prefix only and the path with any ``/ak/{key}`` segment redacted.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
import traceback
from threading import get_ident
from typing import Any, BinaryIO

import orjson
import structlog

from gateway.observability.redact import redact_path, redact_text  # redact_path re-exported: the request line's

# Every value of a log line is bounded: a 3 KB model name, a huge upstream error or a
# long traceback must not make a line that log shippers truncate or drop.
MAX_VALUE_CHARS = 1024
MAX_EXCEPTION_CHARS = 8192

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else f"{value[:limit]}...[{len(value) - limit} more chars]"


def bound_values(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: cut any value longer than ``MAX_VALUE_CHARS`` (tracebacks: ``MAX_EXCEPTION_CHARS``)."""
    for k, v in event.items():
        if isinstance(v, str):
            limit = MAX_EXCEPTION_CHARS if k == "exception" else MAX_VALUE_CHARS
            if len(v) > limit:
                event[k] = _clip(v, limit)
        elif isinstance(v, bytes | bytearray):
            if len(v) > MAX_VALUE_CHARS:
                event[k] = _clip(bytes(v).decode(errors="replace"), MAX_VALUE_CHARS)
        elif isinstance(v, dict | list | tuple | set | frozenset):
            try:
                text = orjson.dumps(v, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
            except TypeError:
                text = repr(v)
            if len(text) > MAX_VALUE_CHARS:
                event[k] = _clip(text, MAX_VALUE_CHARS)
    return event


def _timestamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    event["ts"] = round(time.time(), 3)
    return event


class LoopBatchedWriter:
    """Log lines written once per event-loop pass instead of one syscall per line.

    ``write`` appends to a buffer; ``flush`` schedules one real write with
    ``call_soon`` (so lines of one loop iteration go out together).  Outside a
    running loop (the supervisor, start-up, shutdown) it writes at once.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._buf = bytearray()
        self._scheduled = False
        # The loop of the thread that last flushed inside it: asyncio.get_running_loop() asks the
        # kernel for the pid each time (a syscall per request line), a thread id does not.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def flush(self) -> None:
        if self._scheduled:
            return
        loop = self._loop
        if loop is None or self._thread != get_ident():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.drain()
                return
            self._loop, self._thread = loop, get_ident()
        try:
            loop.call_soon(self.drain)
        except RuntimeError:  # that loop is closed (the worker is exiting): write at once
            self._loop = None
            self.drain()
            return
        self._scheduled = True

    def drain(self) -> None:
        self._scheduled = False
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            try:
                self._raw.write(data)
                self._raw.flush()
            except (BrokenPipeError, ValueError):
                pass  # stdout gone (parent died / closed): nothing to log to


_writer: LoopBatchedWriter | None = None
_line_tail: dict[str, Any] = {"level": "info"}  # the constant fields of a request line (level, worker)
_info = True  # the configured level lets info lines through


def info_enabled() -> bool:
    return _info


def request_line(doc: dict[str, Any]) -> None:
    """The one line per request (``doc`` has a ``path``), rendered straight to the batched writer;
    nothing when the configured level drops info lines.

    structlog's processor chain costs ~200 Python calls a line (it bounds every
    value with isinstance checks); a request line's values are known: numbers,
    booleans, config names, a validated model name, a redacted path (clipped
    here) and bounded tags.  Outside a configured process (in-process tests) it
    goes through structlog like any other line.
    """
    if not _info:
        return
    path = doc["path"]
    if len(path) > MAX_VALUE_CHARS:
        doc["path"] = _clip(path, MAX_VALUE_CHARS)
    w = _writer
    if w is None:
        structlog.get_logger("request").info(**doc)
        return
    doc.update(_line_tail)
    doc["ts"] = round(time.time(), 3)
    # LoopBatchedWriter.write and .flush, inlined (every request): one real write per loop pass.
    w._buf += orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)
    if not w._scheduled:
        w.flush()


def flush() -> None:
    """Write out buffered lines now (called on worker exit)."""
    if _writer is not None:
        _writer.drain()


def configure(level: str = "info", worker: int | None = None) -> None:
    global _writer, _line_tail, _info  # one stdout per process
    _info = _LEVELS[level] <= logging.INFO
    _line_tail = {"level": "info"} if worker is None else {"level": "info", "worker": worker}
    processors: list[Any] = [structlog.processors.add_log_level, _timestamp]
    if worker is not None:
        # A constant field: cheaper than merging contextvars on every line.
        def _worker(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
            event["worker"] = worker
            return event

        processors.append(_worker)
    processors += [
        structlog.processors.format_exc_info,
        _redact_exception,
        bound_values,
        structlog.processors.JSONRenderer(serializer=orjson.dumps),
    ]
    if _writer is not None:
        _writer.drain()
    _writer = LoopBatchedWriter(sys.stdout.buffer)
    atexit.register(flush)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.BytesLoggerFactory(_writer),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through stdlib logging: route warnings and up to stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StdlibJSON())
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), handlers=[handler])


def _redact_exception(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """A rendered traceback quotes exception messages and values: no key shape survives in it."""
    exc = event.get("exception")
    if isinstance(exc, str):
        event["exception"] = redact_text(exc)
    return event


class _StdlibJSON(logging.Formatter):
    """stdlib records (aiohttp, asyncio) as JSON lines, exceptions without their message.

    aiohttp's "Error handling request" exceptions quote the raw request line
    and headers (an ``/ak/{key}`` path, an ``x-api-key``): only the exception
    type and where it was raised (file:line, no values) are kept.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "level": record.levelname.lower(), "logger": record.name,
            "event": _clip(redact_text(record.getMessage()), MAX_VALUE_CHARS),
        }
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc_type"] = record.exc_info[0].__name__
            tb = traceback.extract_tb(record.exc_info[2])
            doc["exc_at"] = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in tb[-5:]]
        doc["ts"] = round(record.created, 3)
        return orjson.dumps(doc).decode()


__all__ = ["configure", "flush", "info_enabled", "redact_path", "request_line"]
