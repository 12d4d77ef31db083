"""Postgres-backed key -> principal resolution, cached in each worker.

- A hit costs no I/O: one SHA-256, one dict lookup (plus a set insert that
  feeds the batched ``last_used_at`` update).
- Misses go to Postgres once per key at a time (single flight).  A key whose
  hash prefix is in the filter of live keys is looked up at once; any other
  needs a token from its client IP's budget and the worker's (policy/
  lookup_gate.py), so a flood of random keys can neither fill memory (both
  caches are bounded LRUs), nor reach Postgres on every request, nor use up
  the lookups that real (and freshly created) keys need.  Over budget an
  unknown key gets 401 while the filter is current, else 503 (never a cached 401).
- Unknown keys are cached negatively for a few seconds.
- Changes arrive by LISTEN/NOTIFY ('k:<key id>' or 'u:<user id>') and drop the
  entries at once; the TTL is the backstop, and every (re)connection of the
  listener drops the whole cache since notifications may have been missed.
- A cache is only as good as its invalidation channel: while the listener is
  not connected (still coming up at start, or reconnecting), no entry counts
  as fresh, so a revocation made in that window is seen on the next request
  (each lookup goes to Postgres, within the lookup budget; over budget or
  with Postgres down the cached entry is served as stale).
- Postgres down: cached keys keep working (also past their TTL, up to
  ``stale_key_seconds``); an unknown key gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256

import asyncpg
import structlog

from gateway import tasks
from gateway.config import Config
from gateway.errors import ErrorKind, GatewayError
from gateway.policy.lookup_gate import PREFIX_LEN, LookupGate
from gateway.policy.principals import KEY_PREFIX, Principal, StandaloneResolver
from gateway.stores import access_keys
from gateway.stores.notify import Listener
from gateway.stores.postgres import Database, DatabaseUnavailable

CHANNEL = "gateway_principals"
MIN_KEY_LEN = len(KEY_PREFIX) + 32
MAX_KEY_LEN = 256

log = structlog.get_logger("keys")


@dataclass(slots=True)
class ResolverStats:
    hits: int = 0
    negative_hits: int = 0
    lookups: int = 0  # queries sent to Postgres
    stale_served: int = 0
    unavailable: int = 0
    throttled: int = 0
    refused_unknown: int = 0  # over budget and not in the live-key filter: answered without a query
    invalidations: int = 0


@dataclass(slots=True)
class _Entry:
    principal: Principal
    fresh_until: float  # monotonic
    retry_at: float = 0.0  # while Postgres is down: serve stale without asking again until then


class PostgresResolver:
    def __init__(self, db: Database, cfg: Config) -> None:
        d = cfg.database
        self.db = db
        self.ttl = d.key_cache_seconds
        self.size = d.key_cache_size
        self.neg_ttl = d.negative_cache_seconds
        self.neg_size = d.negative_cache_size
        self.stale_s = d.stale_key_seconds
        self.timeout = d.timeout_ms / 1000
        self.flush_s = d.last_used_flush_seconds
        self.static = StandaloneResolver(cfg) if cfg.keys else None  # config-file keys keep working
        self._static = self.static.by_digest if self.static is not None else None  # its hash -> principal
        self.stats = ResolverStats()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._negative: OrderedDict[str, float] = OrderedDict()
        # A rotated key has two live secrets (hashes) under one key id.
        self._by_key: dict[str, set[str]] = {}
        self._by_user: dict[str, set[str]] = {}
        self._inflight: dict[str, asyncio.Task[Principal | None]] = {}
        self._generation = 0  # bumped by every invalidation: a lookup that raced one is not cached
        self.gate = LookupGate(d.key_lookup_rate, cfg.auth.key_lookup_rate_per_ip, cfg.auth.new_key_wait_seconds)
        self._filter_loader: asyncio.Task[None] | None = None
        self._listening = False  # the LISTEN connection is up: cached entries can be trusted until their TTL
        self._used: set[str] = set()
        self.listener = Listener(db.dsn, CHANNEL, self._on_notify, self._on_connect, on_disconnect=self._on_disconnect)
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, db: Database, cfg: Config) -> PostgresResolver:
        self = cls(db, cfg)
        self.listener.start()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        return self

    # ---------------------------------------------------------------- hot path

    async def resolve(self, key: str, client_ip: str = "") -> Principal | None:
        # Hashed once (``hash_key`` written out): the config file's keys are found by the same hash.
        h = sha256(key.encode()).hexdigest()
        entry = self._cache.get(h)
        now = time.monotonic()
        if entry is not None and entry.fresh_until > now and self._listening:
            # Only a well-formed key was ever cached (and never a config file's: those are found
            # below, before any lookup); the format check further down is for the others.
            self._cache.move_to_end(h)
            self._used.add(entry.principal.key_id)
            self.stats.hits += 1
            return entry.principal
        if self._static is not None:
            p = self._static.get(h)
            if p is not None:
                return p
        if not (MIN_KEY_LEN <= len(key) <= MAX_KEY_LEN and key.startswith(KEY_PREFIX)):
            return None  # cannot be one of ours: no cache entry, no query
        if entry is not None and entry.retry_at > now:
            self._used.add(entry.principal.key_id)
            self.stats.stale_served += 1
            return entry.principal
        until = self._negative.get(h)
        if until is not None:
            if until > now:
                self.stats.negative_hits += 1
                return None
            del self._negative[h]
        principal = await self._lookup(h, entry, client_ip)
        if principal is not None:
            self._used.add(principal.key_id)
        return principal

    async def _lookup(self, h: str, stale: _Entry | None, client_ip: str) -> Principal | None:
        """One query per key at a time, run as its own task so that a caller who goes away
        (client disconnect) neither cancels it for the others nor leaves it half done."""
        pending = self._inflight.get(h)
        if pending is None and not self.gate.take(h, client_ip):
            self.stats.throttled += 1
            if stale is not None:
                return stale.principal
            if not await self.gate.wait_announced(h):
                if self.gate.current:
                    self.stats.refused_unknown += 1
                    return None  # not a live key's hash: no query needed to say so
                raise GatewayError(ErrorKind.UNAVAILABLE,
                                   "Too many unknown API keys are being checked; retry shortly.", retry_after_s=1.0)
            pending = self._inflight.get(h)  # started by another caller while this one waited
        if pending is None:
            pending = asyncio.get_running_loop().create_task(self._fetch(h, stale))
            self._inflight[h] = pending
            pending.add_done_callback(lambda t: self._fetched(h, t))
        return await asyncio.shield(pending)

    def _fetched(self, h: str, task: asyncio.Task[Principal | None]) -> None:
        if self._inflight.get(h) is task:
            del self._inflight[h]
        if not task.cancelled():
            task.exception()  # retrieved: the callers re-raise it

    async def _fetch(self, h: str, stale: _Entry | None) -> Principal | None:
        generation = self._generation
        try:
            principal = await self._query(h)
        except (DatabaseUnavailable, TimeoutError):
            # Stale-if-error: the entry keeps its old deadline, so this cannot go on forever.
            if stale is not None and time.monotonic() - stale.fresh_until < self.stale_s:
                self.stats.stale_served += 1
                stale.retry_at = time.monotonic() + 1.0
                return stale.principal
            self.stats.unavailable += 1
            raise GatewayError(ErrorKind.UNAVAILABLE, "The key store is unavailable; retry shortly.",
                               retry_after_s=1.0) from None
        if generation == self._generation:  # no invalidation raced this read
            self._store(h, principal)
        return principal

    async def _query(self, h: str) -> Principal | None:
        """The lookup, retried once at once when a pooled connection turns out dead
        (the first use after a Postgres restart); a timeout is not retried."""
        for attempt in (1, 2):
            self.stats.lookups += 1
            try:
                async with self.db.connection(timeout=self.timeout) as conn:
                    return await access_keys.lookup_principal(conn, h, self.timeout)
            except DatabaseUnavailable as exc:
                if attempt == 2 or isinstance(exc.__cause__, TimeoutError) or self.db.pool is None:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _store(self, h: str, principal: Principal | None) -> None:
        now = time.monotonic()
        if principal is None:
            self._drop(h)
            self._negative[h] = now + self.neg_ttl
            self._negative.move_to_end(h)
            while len(self._negative) > self.neg_size:
                self._negative.popitem(last=False)
            return
        self._negative.pop(h, None)
        self._cache[h] = _Entry(principal, now + self.ttl)
        self._cache.move_to_end(h)
        self._by_key.setdefault(principal.key_id, set()).add(h)
        self._by_user.setdefault(principal.user_id, set()).add(h)
        while len(self._cache) > self.size:
            old, _ = next(iter(self._cache.items()))
            self._drop(old)

    def _drop(self, h: str) -> None:
        entry = self._cache.pop(h, None)
        if entry is None:
            return
        p = entry.principal
        key_hashes = self._by_key.get(p.key_id)
        if key_hashes is not None:
            key_hashes.discard(h)
            if not key_hashes:
                del self._by_key[p.key_id]
        hashes = self._by_user.get(p.user_id)
        if hashes is not None:
            hashes.discard(h)
            if not hashes:
                del self._by_user[p.user_id]

    # ---------------------------------------------------------------- invalidation

    def _on_notify(self, payload: str) -> None:
        kind, _, ident = payload.partition(":")
        if kind == "n":
            self.gate.announce(ident)  # a key became live: nothing cached changes
            return
        self._generation += 1
        self.stats.invalidations += 1
        if kind == "k":
            for h in list(self._by_key.get(ident, ())):
                self._drop(h)
        elif kind == "u":
            for h in list(self._by_user.get(ident, ())):
                self._drop(h)

    def _on_connect(self) -> None:
        # Notifications may have been missed while disconnected: start over.
        self._generation += 1
        self.gate.forget()
        if self._filter_loader is not None:
            self._filter_loader.cancel()  # a load from before this reconnection may miss announcements
        self._filter_loader = asyncio.get_running_loop().create_task(self._load_filter())
        if self._cache:
            log.info("key cache dropped after listener (re)connect", entries=len(self._cache))
        self._cache.clear()
        self._by_key.clear()
        self._by_user.clear()
        self._listening = True

    def _on_disconnect(self) -> None:
        # From now on a revocation may not reach us: stop trusting the cache until LISTEN is back.
        self._listening = False
        self._generation += 1

    def invalidate_key(self, key_id: str) -> None:
        """Drop one key at once in this worker (the NOTIFY reaches the others)."""
        self._on_notify(f"k:{key_id}")

    def invalidate_user(self, user_id: str) -> None:
        self._on_notify(f"u:{user_id}")

    def sizes(self) -> tuple[int, int]:
        return len(self._cache), len(self._negative)

    async def _load_filter(self) -> None:
        """The live keys' hash prefixes, retried until Postgres answers (the gate budgets meanwhile)."""
        delay = 0.5
        while True:
            try:
                async with self.db.connection(timeout=5.0) as conn:
                    prefixes = await access_keys.live_hash_prefixes(conn, PREFIX_LEN, timeout=30.0)
            except (DatabaseUnavailable, TimeoutError, asyncpg.PostgresError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.gate.loaded(prefixes)
            return

    # ---------------------------------------------------------------- last_used

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush_last_used()

    async def flush_last_used(self) -> None:
        if not self._used:
            return
        batch, self._used = self._used, set()
        try:
            async with self.db.connection(timeout=self.timeout) as conn:
                await access_keys.touch_last_used(conn, batch, datetime.now(UTC), timeout=5.0)
        except (DatabaseUnavailable, TimeoutError):
            self._used |= batch  # try again next time; bounded by the number of keys

    async def close(self) -> None:
        await tasks.stop(self._flusher)
        await tasks.stop(self._filter_loader)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush_last_used(), timeout=2.0)
        await self.listener.close()
