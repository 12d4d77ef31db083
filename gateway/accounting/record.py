"""One usage record per finished request."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    ts: float  # unix seconds at request start
    key_id: str
    user_id: str
    model: str
    route: str
    upstream: str
    status: int
    streamed: bool
    partial: bool
    input_tokens: int
    output_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    cost_micros: int
    priced: bool  # False: the model had no price (flagged; default price applied)
    upstream_ms: float
    ttft_ms: float | None
    gateway_ms: float
    error_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
