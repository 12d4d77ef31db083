"""Per-request state shared by the middleware, the proxy and the log line."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.accounting.record import UsageRecord

_PROCESS_PREFIX = os.urandom(6).hex()
_counter = itertools.count(1)


def new_request_id() -> str:
    # Unique across workers and restarts (random per process) and cheap
    # (no syscall per request); the ledger deduplicates on it.
    return f"req_{_PROCESS_PREFIX}{next(_counter):010x}"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    start: float  # perf_counter at arrival
    wall_start: float  # unix time at arrival
    dialect: str = "openai"
    route: str = ""
    model: str = ""
    key_prefix: str = ""
    user_id: str = ""
    upstream: str = ""
    upstream_s: float = 0.0  # time spent waiting on upstreams (excluded from gateway time)
    ttft_s: float | None = None
    streamed: bool = False
    partial: bool = False
    error_kind: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_pico: int = 0
    attempts: int = 0
    served_model: str = ""  # the model name the serving upstream received
    retries: int = 0  # attempts repeated on the same upstream
    hedges: int = 0  # second attempts raced against a slow first one
    tags: dict[str, str] | None = None  # cost-attribution tags (accounting/tags.py)
    # Standalone: the usage record rides on the request's one log line (accounting/sink.py).
    record: UsageRecord | None = None

    @classmethod
    def start_now(cls) -> RequestContext:
        # new_request_id(), inlined: every request starts here.
        return cls(f"req_{_PROCESS_PREFIX}{next(_counter):010x}", time.perf_counter(), time.time())

    def gateway_ms(self, now: float | None = None) -> float:
        end = time.perf_counter() if now is None else now
        ms = (end - self.start - self.upstream_s) * 1000.0
        return ms if ms > 0.0 else 0.0

    def server_timing(self) -> str:
        return f"gateway;dur={self.gateway_ms():.3f}"
