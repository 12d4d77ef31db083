"""Webhook signatures: HMAC-SHA256 over ``<timestamp>.<body>`` with the configured secret.

Header (one per delivery)::

    x-gateway-signature: t=1764578000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd

A receiver recomputes ``hex(hmac_sha256(secret, f"{t}.".encode() + raw_body))``,
compares it in constant time with ``v1``, and rejects a ``t`` more than five
minutes from its own clock (a replayed delivery).  ``x-gateway-event-id``
identifies the event: a receiver that saw it already (a retry after a lost
answer) acknowledges without acting twice.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "x-gateway-signature"
EVENT_HEADER = "x-gateway-event-id"
TOLERANCE_S = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance_s: int = TOLERANCE_S) -> bool:
    """What a receiver does (used by the docs' example and by ops tooling)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - ts) > tolerance_s:
        return False
    expected = signature(secret, ts, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))
