"""structlog JSON lines on stdout: orjson renderer, cached, level-filtered.

Nothing secret ever reaches a log line: the request line carries the key's
display prefix only and the path with any ``/ak/{key}`` segment redacted.
"""

from __future__ import annotations

import logging
import sys
import time
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
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=sys.stderr,
                        format='{"level":"%(levelname)s","logger":"%(name)s","event":%(message)r}')


def redact_path(path: str) -> str:
    """``/ak/gwk_secret/v1/messages`` -> ``/ak/***/v1/messages``."""
    if path.startswith("/ak/"):
        rest = path[4:]
        slash = rest.find("/")
        return "/ak/***" + (rest[slash:] if slash >= 0 else "")
    return path
