"""config.Limits <-> the JSONB ``limits`` column, so limits read the same in both modes."""

from __future__ import annotations

from typing import Any

from gateway.config import Limits

_TUPLES = ("models", "allowed_ips")
_INTS = ("rpm", "tpm", "max_concurrency", "max_tokens")


def limits_to_json(limits: Limits) -> dict[str, Any]:
    """Only the limits that are set; ``budget_period`` only alongside a budget."""
    out: dict[str, Any] = {}
    for name in (*_TUPLES, *_INTS, "budget_usd"):
        v = getattr(limits, name)
        if v is not None:
            out[name] = list(v) if name in _TUPLES else v
    if limits.budget_usd is not None:
        out["budget_period"] = limits.budget_period
    return out


def limits_from_json(doc: dict[str, Any] | None) -> Limits:
    """Trusting decode of what limits_to_json wrote (validated on the way in)."""
    if not doc:
        return Limits()
    kwargs: dict[str, Any] = {}
    for name in _TUPLES:
        if doc.get(name) is not None:
            kwargs[name] = tuple(doc[name])
    for name in _INTS:
        if doc.get(name) is not None:
            kwargs[name] = int(doc[name])
    if doc.get("budget_usd") is not None:
        kwargs["budget_usd"] = float(doc["budget_usd"])
    if doc.get("budget_period") in ("day", "month", "total"):
        kwargs["budget_period"] = doc["budget_period"]
    return Limits(**kwargs)
