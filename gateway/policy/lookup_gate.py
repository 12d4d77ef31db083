"""Who may make a key-store lookup: real keys always, unknown ones within budgets.

A cache miss costs a Postgres query, so misses are budgeted; the budget must
not be a commons that one client's flood of random keys can exhaust for the
keys that are real.  Three layers:

1. A filter of the hash prefixes of every live key (loaded at each listener
   (re)connection, kept current by 'n:<prefix>' notifications from a trigger
   on access_keys).  A key whose prefix is known is looked up at once, never
   throttled by anyone's flood.
2. A key whose prefix is unknown is most likely random (or created this very
   instant, its notification still on the way): it needs a token from its
   client IP's bucket (``auth.key_lookup_rate_per_ip``), then from the
   worker's bucket (``database.key_lookup_rate``).
3. Over budget it waits up to ``auth.new_key_wait_seconds`` for its prefix to
   be announced: a key created a moment ago still resolves; a random one is
   refused (401 while the filter is current, 503 when it is not: after a lost
   listener connection nothing can be told apart).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

PREFIX_LEN = 16  # hex digits of the key's SHA-256 (64 bits: a random key matches with p ~ n / 2**64)
MAX_IPS = 10_000  # client buckets kept (LRU)
MAX_WAITERS = 1_000  # over-budget lookups waiting for an announcement at once


class TokenBucket:
    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class LookupGate:
    def __init__(self, rate: float, rate_per_ip: float, wait_s: float) -> None:
        self.rate_per_ip = rate_per_ip
        self.wait_s = wait_s
        self.bucket = TokenBucket(rate)
        self._ips: OrderedDict[str, TokenBucket] = OrderedDict()
        self.known: set[str] | None = None  # None: not loaded since the last (re)connection
        self._noted: set[str] = set()  # announcements that arrived while a load was running
        self._waiters: dict[str, asyncio.Future[None]] = {}

    @property
    def current(self) -> bool:
        """The filter holds every live key: an absent prefix is not a key."""
        return self.known is not None

    # ------------------------------------------------------------ filter upkeep

    def forget(self) -> None:
        """The listener (re)connected: announcements may have been missed until the next load."""
        self.known = None
        self._noted = set()

    def loaded(self, prefixes: set[str]) -> None:
        self.known = prefixes | self._noted
        self._noted = set()

    def announce(self, prefix: str) -> None:
        self._noted.add(prefix)
        if self.known is not None:
            self.known.add(prefix)
        waiter = self._waiters.pop(prefix, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------ the decision

    def is_known(self, key_hash: str) -> bool:
        return self.known is not None and key_hash[:PREFIX_LEN] in self.known

    def take(self, key_hash: str, client_ip: str) -> bool:
        """May this miss query the store now?"""
        if self.is_known(key_hash):
            return True
        bucket = self._ips.get(client_ip)
        if bucket is None:
            bucket = self._ips[client_ip] = TokenBucket(self.rate_per_ip)
            if len(self._ips) > MAX_IPS:
                self._ips.popitem(last=False)
        else:
            self._ips.move_to_end(client_ip)
        return bucket.take() and self.bucket.take()

    async def wait_announced(self, key_hash: str) -> bool:
        """Over budget: wait a moment for the key's announcement; True if it came."""
        prefix = key_hash[:PREFIX_LEN]
        if self.is_known(key_hash):
            return True
        if self.wait_s <= 0 or (prefix not in self._waiters and len(self._waiters) >= MAX_WAITERS):
            return False
        waiter = self._waiters.get(prefix)
        if waiter is None:
            waiter = self._waiters[prefix] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=self.wait_s)
        except TimeoutError:
            if self._waiters.get(prefix) is waiter:
                del self._waiters[prefix]
            return self.is_known(key_hash)
        return True
