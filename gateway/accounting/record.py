"""One usage record per finished request."""

from __future__ import annotations

from dataclasses import dataclass, fields
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
    cost_pico: int  # exact cost in pico-dollars (accounting/money.py)
    priced: bool  # False: the model had no price (flagged; default price applied)
    upstream_ms: float
    ttft_ms: float | None
    gateway_ms: float
    error_kind: str | None = None
    served_model: str = ""  # the upstream's model name (``model`` is the public name the client sent)
    # Not a ledger column: the Redis budget counters this cost is applied to
    # once the record is committed (kept in the journal for replays).
    budget_keys: tuple[str, ...] = ()
    tags: dict[str, str] | None = None  # cost-attribution tags (usage_ledger.tags, migration 0021)

    def to_dict(self) -> dict[str, Any]:
        # Every field is a scalar: a shallow dict is what asdict() would give,
        # without its recursive deep copy (~20 us a record on the hot path).
        d = {name: getattr(self, name) for name in _FIELDS}
        if not self.budget_keys:
            del d["budget_keys"]
        if self.tags is None:
            del d["tags"]
        return d


    def add_to_line(self, line: dict[str, object]) -> None:
        """The usage fields the request's log line does not carry already (standalone's one line)."""
        line["usage"] = True
        line["key_id"] = self.key_id
        line["input_tokens"] = self.input_tokens
        line["output_tokens"] = self.output_tokens
        line["cache_write_tokens"] = self.cache_write_tokens
        line["cache_read_tokens"] = self.cache_read_tokens
        line["cost_pico"] = self.cost_pico
        line["priced"] = self.priced
        line["ttft_ms"] = self.ttft_ms
        if self.tags is not None:
            line["tags"] = self.tags


_FIELDS = tuple(f.name for f in fields(UsageRecord))
