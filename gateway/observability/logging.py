"""structlog JSON lines on stdout: orjson renderer, cached, level-filtered.

Nothing secret ever reaches a log line: the request line carries the key's
display prefix only and the path with any ``/ak/{key}`` segment redacted.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _timestamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    event["ts"] = round(time.time(), 3)
    return event


def configure(level: str = "info", worker: int | None = None) -> None:
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
    ]
    if worker is not None:
        structlog.contextvars.bind_contextvars(worker=worker)
    processors += [
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=orjson.dumps),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through stdlib logging: route warnings and up to stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StdlibJSON())
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), handlers=[handler])


class _StdlibJSON(logging.Formatter):
    """stdlib records (aiohttp, asyncio) as JSON lines, exceptions without their message.

    aiohttp's "Error handling request" exceptions quote the raw request line
    and headers (an ``/ak/{key}`` path, an ``x-api-key``): only the exception
    type and where it was raised (file:line, no values) are kept.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"level": record.levelname.lower(), "logger": record.name, "event": record.getMessage()}
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc_type"] = record.exc_info[0].__name__
            tb = traceback.extract_tb(record.exc_info[2])
            doc["exc_at"] = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in tb[-5:]]
        doc["ts"] = round(record.created, 3)
        return orjson.dumps(doc).decode()


def redact_path(path: str) -> str:
    """``/ak/gwk_secret/v1/messages`` -> ``/ak/***/v1/messages``."""
    if path.startswith("/ak/"):
        rest = path[4:]
        slash = rest.find("/")
        return "/ak/***" + (rest[slash:] if slash >= 0 else "")
    return path
