"""Retry policy: backoff with full jitter, retry-after parsing, and budgets that stop a storm.

A budget is kept per upstream and worker.  Every request to the upstream
deposits ``ratio`` of a token, time adds ``per_second`` tokens a second, and
an extra attempt (a retry, or a hedge) takes one whole token: extra attempts
stay at most ``ratio`` of requests plus ``per_second`` a second, so an outage
is never amplified into a storm.  The balance is capped: a long quiet spell
does not save up a burst.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime

RATIO = 0.2  # extra attempts per request
PER_SECOND = 3.0  # plus this many a second
CAP = 10.0  # most tokens a budget holds


class Budget:
    """Deposits are counted (``pending += 1``: the hot path, no call) and folded in at the next
    withdrawal: each is capped the same way, so folding them later gives the same balance."""

    __slots__ = ("_clock", "_last", "balance", "cap", "denied", "pending", "per_second", "ratio")

    def __init__(self, ratio: float = RATIO, per_second: float = PER_SECOND, cap: float = CAP,
                 clock: Callable[[], float] | None = None) -> None:
        self.ratio = ratio
        self.per_second = per_second
        self.cap = cap
        self._clock = clock or time.monotonic
        self._last = self._clock()
        self.balance = min(cap, per_second)  # a fresh worker may retry a little at once
        self.denied = 0  # extra attempts refused (for metrics)
        self.pending = 0  # deposits not yet folded into the balance

    def deposit(self) -> None:
        """One request went to the upstream (the proxy counts ``pending`` itself)."""
        self.pending += 1

    def withdraw(self) -> bool:
        """Take a token for one extra attempt; False when the budget is spent."""
        now = self._clock()
        b = self.balance
        if self.pending:
            # min(cap, b + ratio) n times over is min(cap, b + n * ratio): the cap only ever lowers.
            b = min(self.cap, b + self.pending * self.ratio)
            self.pending = 0
        b = b + (now - self._last) * self.per_second
        self._last = now
        if b > self.cap:
            b = self.cap
        if b < 1.0:
            self.balance = b
            self.denied += 1
            return False
        self.balance = b - 1.0
        return True


def backoff(retry: int, base_ms: float, cap_s: float, rnd: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number ``retry`` (0-based): full jitter, uniform in [0, base * 2^retry]."""
    ceiling = min(cap_s, base_ms / 1000.0 * float(2**retry))
    return float(rnd() * ceiling)


def retry_after(headers: Mapping[str, str], now: Callable[[], float] = time.time) -> float | None:
    """Seconds the upstream asked to wait: ``retry-after-ms``, else ``retry-after`` (seconds or an HTTP date)."""
    raw = headers.get("retry-after-ms")
    if raw is not None:
        try:
            ms = float(raw)
        except ValueError:
            ms = -1.0
        if ms >= 0 and ms == ms:  # not NaN
            return ms / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        secs = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        return max(0.0, when.timestamp() - now())
    return secs if secs >= 0 and secs == secs else None
