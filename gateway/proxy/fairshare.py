"""Fair share of the upstream connection pool: no key or user may take all of it.

Each worker's pool to an upstream holds ``max_connections`` connections.
Without a share, one key opening thousands of streams takes every connection
and everyone else queues behind it.  Here each key may hold at most
``server.key_pool_share`` of the pool at once, and each user (all its keys)
``server.user_pool_share``; a request over its share waits (first come,
first served) up to ``server.share_wait_seconds`` for one of its own to
finish, then gets 429.  Other tenants' requests never wait for it.

It complements ``max_concurrency`` (a global limit kept in Redis, unset by
default): the share bounds every key even when no limit was set.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

from gateway.errors import ErrorKind, GatewayError
from gateway.proxy.routing import Deployment


def pool_size(candidates: list[Deployment]) -> int:
    """The pool a request draws from: the largest of its candidate upstreams' (per worker)."""
    if len(candidates) == 1:
        return candidates[0].upstream.cfg.max_connections
    return max((d.upstream.cfg.max_connections for d in candidates), default=1)


@dataclass(slots=True)
class FairShareStats:
    queued: int = 0  # requests that had to wait for their share
    refused: int = 0  # requests answered 429 for being over their share


class _Slot:
    __slots__ = ("busy", "waiters")

    def __init__(self) -> None:
        self.busy = 0
        self.waiters: deque[asyncio.Future[None]] = deque()


class Lease:
    """Held while a request uses the upstream pool; ``release`` exactly once."""

    __slots__ = ("_key", "_owner", "_released", "_user")

    def __init__(self, owner: FairShare, key: str, user: str) -> None:
        self._owner = owner
        self._key = key
        self._user = user
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner.give_back(self._key, self._user)


Held = tuple[_Slot, _Slot]  # a key's and its user's slot, while a request holds its share


# Idle slots are kept (a key's next request reuses its slot); a table this full drops its idle ones.
MAX_IDLE_SLOTS = 10_000


class FairShare:
    def __init__(self, key_share: float, user_share: float, wait_s: float) -> None:
        self.key_share = key_share
        self.user_share = user_share
        self.wait_s = wait_s
        self._keys: dict[str, _Slot] = {}
        self._users: dict[str, _Slot] = {}
        self._caps: dict[int, tuple[int, int]] = {}
        self.stats = FairShareStats()

    def caps(self, pool: int) -> tuple[int, int]:
        return max(1, math.floor(self.key_share * pool)), max(1, math.floor(self.user_share * pool))

    def take(self, key: str, user: str, pool: int) -> Held | None:
        """Take a share now if one is free (the common case: no await): the slots to ``release``;
        else None (see ``wait``).  A held slot is busy, so it is never tidied away meanwhile."""
        try:
            key_cap, user_cap = self._caps[pool]
        except KeyError:
            key_cap, user_cap = self._caps[pool] = self.caps(pool)
        try:
            k = self._keys[key]
        except KeyError:
            if len(self._keys) >= MAX_IDLE_SLOTS:
                self._tidy_all()
            k = self._keys[key] = _Slot()
        try:
            u = self._users[user]
        except KeyError:
            if len(self._users) >= MAX_IDLE_SLOTS:
                self._tidy_all()
            u = self._users[user] = _Slot()
        if k.busy < key_cap and u.busy < user_cap:
            k.busy += 1
            u.busy += 1
            return k, u
        return None

    def release(self, held: Held) -> None:
        """The end of a share taken by ``take`` or ``wait`` (exactly once per share)."""
        k, u = held
        k.busy -= 1
        if k.waiters:
            self._wake(k)
        u.busy -= 1
        if u.waiters:
            self._wake(u)

    def give_back(self, key: str, user: str) -> None:
        """``release`` by name."""
        k = self._keys.get(key)
        u = self._users.get(user)
        if k is not None and u is not None:
            self.release((k, u))

    async def acquire(self, key: str, user: str, pool: int) -> Lease:
        if self.take(key, user, pool) is None:
            await self.wait(key, user, pool)
        return Lease(self, key, user)

    async def wait(self, key: str, user: str, pool: int) -> Held:
        """Wait (first come, first served) up to ``wait_s`` for a share, and take it; 429 when none came."""
        key_cap, user_cap = self.caps(pool)
        self.stats.queued += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            # Looked up again on every pass: an idle slot may have been dropped and made anew meanwhile.
            k = self._keys.get(key)
            if k is None:
                k = self._keys[key] = _Slot()
            u = self._users.get(user)
            if u is None:
                u = self._users[user] = _Slot()
            if k.busy < key_cap and u.busy < user_cap:
                k.busy += 1
                u.busy += 1
                return k, u
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.stats.refused += 1
                raise GatewayError(
                    ErrorKind.RATE_LIMITED,
                    f"Too many concurrent requests for this key or user (its fair share of the upstream pool is "
                    f"{key_cap} per key, {user_cap} per user, per gateway process); retry shortly.",
                    retry_after_s=1.0,
                )
            blocked = k if k.busy >= key_cap else u
            waiter: asyncio.Future[None] = loop.create_future()
            blocked.waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, timeout=remaining)
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(blocked)  # woken, then gone: hand the wake-up on
                raise
            finally:
                if waiter in blocked.waiters:
                    blocked.waiters.remove(waiter)

    @staticmethod
    def _wake(slot: _Slot) -> None:
        while slot.waiters:
            waiter = slot.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _tidy_all(self) -> None:
        for table in (self._keys, self._users):
            for name in [n for n, slot in table.items() if slot.busy <= 0 and not slot.waiters]:
                del table[name]

    def in_flight(self, key: str) -> int:
        slot = self._keys.get(key)
        return slot.busy if slot is not None else 0
