"""Limiters behind admission: shared counters in Redis, or per-process counters.

``RedisLimiter.reserve`` makes one round trip: the versioned ADMIT script
checks every limit of the key and of its user (requests and tokens per
rolling minute, a concurrency lease, the budget at the request's worst-case
cost) and reserves all of them or none.  ``settle`` moves the reservation to
the real tokens and cost and releases the lease; settlements are queued and
sent together (one pipeline per flush), off the hot path.  With a ledger
writer (``attach_ledger``), a budget's settled cost stays held until the
usage record is committed to Postgres; ``apply_committed`` then moves it into
the counter, so that a counter rebuilt from the ledger never counts a record
twice or misses one still in a journal (see ``stores/redis_scripts.py``).
Leases and budget reservations are renewed while their request runs and
lapse by themselves when their worker dies.

``LocalLimiter`` runs the same arithmetic (``policy/windows.py``) in process
memory: the standalone mode's limiter, and the fallback while Redis is
unreachable (``redis.failure_mode = "local"``), where each worker takes its
share (1 / (workers x instances)) of every limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from gateway.accounting.pricing import PriceTable
from gateway.accounting.record import UsageRecord
from gateway.config import Config
from gateway.errors import ErrorKind, GatewayError
from gateway.policy.admit import RequestFacts, Reservation
from gateway.policy.budget_rebuild import BudgetScope, LedgerSpend
from gateway.policy.plans import (
    DEFAULT_OUTPUT_RESERVE,
    PLAN_CACHE_MAX,
    Held,
    LimiterStats,
    Plan,
    Planner,
    demand,
    duration,
    rate_headers,
    rejection,
    scope_of,
)
from gateway.policy.principals import Principal
from gateway.policy.windows import Decision, LocalCounters
from gateway.stores import redis_scripts as scripts
from gateway.stores.redis import REDIS_ERRORS, RedisStore
from gateway.stores.resp import encode_parts

log = structlog.get_logger("limits")

_PARKED_MAX = 100_000

RebuildHook = Callable[[Sequence[BudgetScope]], Awaitable[LedgerSpend | Mapping[BudgetScope, int] | None]]
# A settled cost waiting for its ledger commit is held at most this long (a
# Postgres outage longer than that releases it; the commit still applies it).
COMMIT_HOLD_MS = 3_600_000
_MARK_TTL_MS = 30_000  # a rebase not finished by then is abandoned (APPLY adds directly again)

__all__ = ["DEFAULT_OUTPUT_RESERVE", "LocalLimiter", "RebuildHook", "RedisLimiter", "duration"]


# --------------------------------------------------------------------------- local


class LocalLimiter:
    """Per-process counters; each process takes ``1/share`` of every limit.

    ``share`` is 1 for a single worker; the standalone mode and the Redis
    fallback pass workers x instances so that all processes together stay
    within the configured limit.
    """

    def __init__(self, prices: PriceTable, *, share: int = 1, prefix: str = "gw") -> None:
        self.prices = prices
        self.share = max(1, share)
        self.planner = Planner(prefix)
        self.counters = LocalCounters()
        self.stats = LimiterStats()
        self._limits: dict[int, tuple[Plan, tuple[int, ...]]] = {}
        self._calls = 0

    def _local_limits(self, plan: Plan, budget_spent: Mapping[str, int] | None) -> tuple[int, ...]:
        if budget_spent is None:
            hit = self._limits.get(id(plan))
            if hit is not None and hit[0] is plan:
                return hit[1]
        out = []
        for c in plan.checks:
            if c.kind == "b":
                left = c.limit - (budget_spent.get(c.key, 0) if budget_spent else 0)
                out.append(max(0, left) // self.share)
            else:
                out.append(max(1, c.limit // self.share))
        limits = tuple(out)
        if budget_spent is None:
            if len(self._limits) >= PLAN_CACHE_MAX:
                self._limits.clear()
            self._limits[id(plan)] = (plan, limits)
        return limits

    async def reserve(self, principal: Principal, facts: RequestFacts) -> Reservation:
        plan = self.planner.plan(principal)
        if plan is None:
            return Reservation()
        return self.reserve_plan(plan, facts)

    def reserve_plan(
        self, plan: Plan, facts: RequestFacts, budget_spent: Mapping[str, int] | None = None
    ) -> Reservation:
        limits = self._local_limits(plan, budget_spent)
        token_cap = min((limits[i] for i in plan.token_i), default=0)
        tokens, cost = demand(plan, facts, self.prices, token_cap)
        now_ms = time.monotonic_ns() // 1_000_000
        self._calls += 1
        if self._calls % 4096 == 0:
            self.counters.prune(now_ms)
        checks = [(c.kind, c.key, limits[i]) for i, c in enumerate(plan.checks)]
        d = self.counters.admit(checks, now_ms, facts.request_id, tokens, cost)
        headers = rate_headers(plan, limits, d)
        if not d.status:
            err = rejection(plan, limits, d, cost, headers)
            if err.kind is ErrorKind.BUDGET_EXCEEDED:
                self.stats.budget_exceeded += 1
            else:
                self.stats.rate_limited += 1
            raise err
        self.stats.admitted += 1
        state = Held(plan, facts.request_id, d.sec, tokens, cost, local=True) if plan.settle else None
        return Reservation(headers=headers, state=state)

    def release(self, held: Held, tokens: int, cost: int) -> None:
        checks = [(held.plan.checks[i].kind, held.plan.checks[i].key) for i in held.plan.settle]
        self.counters.settle(checks, held.member, held.sec, tokens - held.tokens, held.cost, cost)
        self.stats.settles += 1

    async def settle(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation, tokens: int, cost_micros: int
    ) -> None:
        if isinstance(reservation.state, Held):
            self.release(reservation.state, tokens, cost_micros)

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------- redis


@dataclass(slots=True)
class _Pending:
    keys: list[str]
    args: list[Any]


@dataclass(slots=True)
class _Flush:
    items: list[_Pending] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class RedisLimiter:
    """Shared limits: one ADMIT script per request, settlements batched."""

    def __init__(
        self,
        cfg: Config,
        store: RedisStore,
        prices: PriceTable,
        *,
        rebuild: RebuildHook,
        share: int = 1,
    ) -> None:
        rc = cfg.redis
        self.store = store
        self.prices = prices
        self.rebuild = rebuild
        self.mode = rc.failure_mode
        self.retry_seconds = rc.retry_seconds
        self.timeout = rc.timeout_ms / 1000.0
        self.lease_ms = int(rc.lease_seconds * 1000)
        self.planner = Planner(rc.key_prefix)
        self.local = LocalLimiter(prices, share=share, prefix=rc.key_prefix)
        self.stats = LimiterStats()
        self._spent: dict[str, int] = {}  # budget key -> spend last seen in Redis
        self._outage_spend: dict[str, int] = {}  # budget key -> spent under local limits
        self._held: dict[str, Held] = {}  # request id -> lease held in Redis
        self._flush = _Flush()
        self._flusher: asyncio.Task[None] | None = None
        self._parked: deque[_Pending] = deque(maxlen=_PARKED_MAX)
        self._rebuilding: dict[tuple[str, ...], asyncio.Future[None]] = {}
        self._rebuild_block_until = 0.0
        self._heads: dict[tuple[int, str], tuple[Plan, bytes]] = {}
        self._orphans: set[asyncio.Task[None]] = set()
        self._tails: dict[int, tuple[Plan, bytes]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self.ledger = False  # a ledger writer applies committed costs (attach_ledger)
        self._stale: dict[str, tuple[BudgetScope, int]] = {}  # counters missing an application
        self._touched: dict[str, tuple[BudgetScope, int]] = {}  # counters used since the last reconcile
        self._plan_scopes: dict[int, tuple[Plan, dict[str, tuple[BudgetScope, int]]]] = {}
        self.reconcile_s = rc.budget_reconcile_seconds
        self._reconciler: asyncio.Task[None] | None = None
        store.on_recover(self._recovered)

    def attach_ledger(self) -> None:
        """A ledger writer will call ``apply_committed`` for every committed record with budget keys."""
        self.ledger = True
        if self.reconcile_s > 0 and self._reconciler is None:
            self._reconciler = asyncio.get_running_loop().create_task(self._reconcile())

    @property
    def degraded(self) -> bool:
        return not self.store.healthy

    async def start(self, timeout: float = 2.0) -> None:
        """Connect and load the scripts before traffic (the first request pays no NOSCRIPT round trip)."""
        try:
            async with asyncio.timeout(timeout):
                for script in scripts.ALL:
                    if self.store.fast is not None:
                        await self.store.fast.call("SCRIPT", "LOAD", script.source)
                    else:
                        await self.store.client.script_load(script.source)
        except REDIS_ERRORS as exc:
            self.store.failed(exc)

    # -- redis calls ------------------------------------------------------------

    async def _eval(self, script: scripts.Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        fast = self.store.fast
        if fast is not None:  # its watchdog enforces the timeout
            try:
                return await fast.call("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await fast.call("EVAL", script.source, len(keys), *keys, *args)
        client = self.store.client
        async with asyncio.timeout(self.timeout):
            try:
                return await client.evalsha(script.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
            except NoScriptError:
                return await client.eval(script.source, len(keys), *keys, *args)  # type: ignore[no-untyped-call]

    def _head(self, script: scripts.Script, plan: Plan, keys: Sequence[str]) -> bytes:
        """``EVALSHA sha n keys...`` of a plan, encoded once."""
        cache_key = (id(plan), script.name)
        hit = self._heads.get(cache_key)
        if hit is not None and hit[0] is plan:
            return hit[1]
        head = encode_parts("EVALSHA", script.sha, len(keys), *keys)
        if len(self._heads) >= PLAN_CACHE_MAX:
            self._heads.clear()
        self._heads[cache_key] = (plan, head)
        return head

    async def _admit(self, plan: Plan, member: str, tokens: int, cost: int) -> Any:
        fast = self.store.fast
        if fast is None:
            return await self._eval(scripts.ADMIT, plan.keys, (member, tokens, cost, self.lease_ms, *plan.args))
        tail = self._tails.get(id(plan))
        if tail is None or tail[0] is not plan:
            if len(self._tails) >= PLAN_CACHE_MAX:
                self._tails.clear()
            tail = self._tails[id(plan)] = (plan, encode_parts(self.lease_ms, *plan.args))
        count = 7 + len(plan.keys) + len(plan.args)
        parts = self._head(scripts.ADMIT, plan, plan.keys) + encode_parts(member, tokens, cost) + tail[1]
        try:
            reply = await fast.send_encoded(count, parts)
            try:
                return await asyncio.shield(reply)
            except asyncio.CancelledError:
                # The client went away mid-admission: whatever the script reserved goes back.
                reply.add_done_callback(functools.partial(self._release_orphan, plan, member, tokens, cost))
                raise
        except NoScriptError:
            return await self._eval(scripts.ADMIT, plan.keys, (member, tokens, cost, self.lease_ms, *plan.args))

    def _release_orphan(self, plan: Plan, member: str, tokens: int, cost: int, reply: asyncio.Future[Any]) -> None:
        if reply.cancelled() or reply.exception() is not None:
            return
        raw = reply.result()
        if raw[0] != 1 or not plan.settle:
            return
        held = Held(plan, member, raw[1], tokens, cost)
        task = asyncio.get_running_loop().create_task(self._settle_held(held, 0, 0))
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    async def _eval_many(self, script: scripts.Script, items: Sequence[_Pending]) -> None:
        """One round trip for many calls of ``script`` (per node on a Cluster)."""
        if len(items) == 1 or self.store.fast is not None:  # the fast connection pipelines by itself
            results = await asyncio.gather(
                *(self._eval(script, it.keys, it.args) for it in items), return_exceptions=True
            )
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            return
        async with asyncio.timeout(self.timeout * 2):
            results = await self._pipeline(script, items)
            missing = [it for it, r in zip(items, results, strict=True) if isinstance(r, NoScriptError)]
            if missing:
                await self.store.client.script_load(script.source)
                results = await self._pipeline(script, missing)
        for r in results:
            if isinstance(r, REDIS_ERRORS):
                raise r

    async def _pipeline(self, script: scripts.Script, items: Sequence[_Pending]) -> list[Any]:
        client = self.store.client
        if isinstance(client, RedisCluster):
            # Cluster pipelines refuse scripts: one call per item, all in flight at once.
            calls = (client.evalsha(script.sha, len(it.keys), *it.keys, *it.args) for it in items)  # type: ignore[no-untyped-call]
            return await asyncio.gather(*calls, return_exceptions=True)
        pipe = client.pipeline(transaction=False)
        for it in items:
            pipe.evalsha(script.sha, len(it.keys), *it.keys, *it.args)  # type: ignore[no-untyped-call]
        return await pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

    # -- admission --------------------------------------------------------------

    async def reserve(self, principal: Principal, facts: RequestFacts) -> Reservation:
        plan = self.planner.plan(principal)
        if plan is None:
            return Reservation()
        res = await self._reserve(plan, facts)
        if self.ledger and plan.budget_keys:
            res.budget_keys = plan.budget_keys
            self._touched.update(self._scopes_of(plan))
        return res

    def _scopes_of(self, plan: Plan) -> dict[str, tuple[BudgetScope, int]]:
        hit = self._plan_scopes.get(id(plan))
        if hit is not None and hit[0] is plan:
            return hit[1]
        if len(self._plan_scopes) >= PLAN_CACHE_MAX:
            self._plan_scopes.clear()
        checks = [plan.checks[i] for i in plan.budget_i]
        scopes = dict(zip(plan.budget_keys, zip(_scopes(plan, checks), (c.ttl_s for c in checks), strict=True), strict=True))
        self._plan_scopes[id(plan)] = (plan, scopes)
        return scopes

    async def _reserve(self, plan: Plan, facts: RequestFacts) -> Reservation:
        if not self.store.healthy:
            return await self._degraded(plan, facts)
        limits = plan.limits
        token_cap = min((limits[i] for i in plan.token_i), default=0)
        tokens, cost = demand(plan, facts, self.prices, token_cap)
        try:
            raw = await self._admit(plan, facts.request_id, tokens, cost)
            if raw[0] == -1:
                await self._rebuild(plan)
                raw = await self._admit(plan, facts.request_id, tokens, cost)
                if raw[0] == -1:
                    raise _RebuildFailed
        except REDIS_ERRORS as exc:
            self.store.failed(exc)
            return await self._degraded(plan, facts)
        except _RebuildFailed:
            return await self._degraded(plan, facts)
        n = len(plan.checks)
        d = Decision(raw[0], raw[1], raw[2], raw[3], list(raw[4 : 4 + 2 * n : 2]), list(raw[5 : 5 + 2 * n : 2]))
        for i in plan.budget_i:
            self._spent[plan.checks[i].key] = d.used[i] - (cost if d.status else 0)
        headers = rate_headers(plan, limits, d)
        if not d.status:
            err = rejection(plan, limits, d, cost, headers)
            if err.kind is ErrorKind.BUDGET_EXCEEDED:
                self.stats.budget_exceeded += 1
            else:
                self.stats.rate_limited += 1
            raise err
        self.stats.admitted += 1
        if not plan.settle:
            return Reservation(headers=headers)
        held = Held(plan, facts.request_id, d.sec, tokens, cost)
        if plan.renew_keys:
            self._held[held.member] = held
            if self._renewer is None:
                self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())
        return Reservation(headers=headers, state=held)

    async def _degraded(self, plan: Plan, facts: RequestFacts) -> Reservation:
        self.stats.degraded += 1
        if self.mode == "open":
            return Reservation()
        if self.mode == "closed":
            raise GatewayError(
                ErrorKind.UNAVAILABLE, "The rate-limit store is unavailable; try again shortly.",
                retry_after_s=self.retry_seconds,
            )
        if any(plan.checks[i].key not in self._spent for i in plan.budget_i):
            await self._learn_spend(plan)
        return self.local.reserve_plan(plan, facts, budget_spent=self._spent)

    async def _learn_spend(self, plan: Plan) -> None:
        """Redis is down and this worker never saw a budget's spend: ask the ledger, so no fresh budget."""
        if time.monotonic() < self._rebuild_block_until:
            return
        checks = [plan.checks[i] for i in plan.budget_i if plan.checks[i].key not in self._spent]
        scopes = _scopes(plan, checks)
        try:
            ledger = await self._ledger_spend(scopes, "budget spend unknown while redis is down")
        except _RebuildFailed:
            return
        if ledger is not None:
            spent = _amounts(ledger)
            for c, scope in zip(checks, scopes, strict=True):
                self._spent[c.key] = spent.get(scope, 0)

    async def _ledger_spend(self, scopes: list[BudgetScope], failure_event: str) -> Any:
        """Ask the ledger for the scopes' spend; on any failure back off and raise _RebuildFailed."""
        try:
            async with asyncio.timeout(max(1.0, 5 * self.timeout)):
                return await self.rebuild(scopes)
        except Exception as exc:  # noqa: BLE001 - any ledger failure means the same: unknown spend
            self.stats.rebuild_failures += 1
            self._rebuild_block_until = time.monotonic() + self.retry_seconds
            log.warning(failure_event, error=type(exc).__name__)
            raise _RebuildFailed from None

    # -- budget rebuild ---------------------------------------------------------

    async def _rebuild(self, plan: Plan) -> None:
        """Seed the plan's missing budget counters from the ledger (once per worker at a time)."""
        if time.monotonic() < self._rebuild_block_until:
            raise _RebuildFailed
        ident = tuple(plan.checks[i].key for i in plan.budget_i)
        running = self._rebuilding.get(ident)
        if running is not None:
            await asyncio.shield(running)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._rebuilding[ident] = fut
        try:
            await self._seed(plan)
            fut.set_result(None)
        finally:
            del self._rebuilding[ident]
            if not fut.done():
                fut.set_exception(_RebuildFailed())
                fut.exception()  # marked retrieved: each waiter raises its own copy

    async def _seed(self, plan: Plan) -> None:
        checks = [plan.checks[i] for i in plan.budget_i]
        scopes = _scopes(plan, checks)
        # The ledger cannot tell: do not enforce a budget we cannot know.
        ledger = await self._ledger_spend(scopes, "budget rebuild failed; local limits meanwhile")
        snapshot = ledger.snapshot if isinstance(ledger, LedgerSpend) else ""
        amounts = _amounts(ledger) if ledger is not None else {}
        args: list[Any] = [os.urandom(8).hex(), snapshot, ""]
        for c, scope in zip(checks, scopes, strict=True):
            if ledger is not None:
                spent = amounts.get(scope, 0)
            else:  # no ledger: the most this worker has seen spent (an upper bound, never a fresh budget)
                spent = self._spent.get(c.key, 0) + self._outage_spend.get(c.key, 0)
            args += (spent, c.ttl_s)
        created = await self._eval(scripts.SEED, [c.key for c in checks], args)
        self.stats.rebuilds += int(created)
        if created:
            log.info("budget counters rebuilt", counters=int(created), from_ledger=ledger is not None)
        for c in checks:
            self._outage_spend.pop(c.key, None)

    # -- settlement -------------------------------------------------------------

    async def settle(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation, tokens: int, cost_micros: int
    ) -> None:
        held = reservation.state
        if isinstance(held, Held):
            await self._settle_held(held, tokens, cost_micros)

    async def _settle_held(self, held: Held, tokens: int, cost_micros: int) -> None:
        if held.local:
            self.local.release(held, tokens, cost_micros)
            if not self.ledger:  # with a ledger, the commit applies it (apply_committed)
                for key in held.plan.budget_keys:
                    self._outage_spend[key] = self._outage_spend.get(key, 0) + cost_micros
            return
        self._held.pop(held.member, None)
        plan = held.plan
        for i in plan.budget_i:
            key = plan.checks[i].key
            self._spent[key] = self._spent.get(key, 0) + cost_micros
        keys = plan.settle_keys
        args: list[Any] = [held.member, held.sec, tokens - held.tokens, cost_micros, COMMIT_HOLD_MS if self.ledger else 0]
        args += (plan.checks[i].kind for i in plan.settle)
        self.stats.settles += 1
        fast = self.store.fast
        if fast is not None and self.store.healthy:
            # The pipelined connection batches whatever is written in one loop iteration.
            try:
                try:
                    await fast.call_encoded(
                        3 + len(keys) + len(args), self._head(scripts.SETTLE, plan, keys) + encode_parts(*args)
                    )
                except NoScriptError:
                    await self._eval(scripts.SETTLE, keys, args)
            except REDIS_ERRORS as exc:
                self.store.failed(exc)
                self._parked.append(_Pending(list(keys), args))
                self.stats.parked += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush.items.append(_Pending(list(keys), args))
        self._flush.waiters.append(waiter)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_settlements())
        await waiter

    async def _flush_settlements(self) -> None:
        """Send whatever queued up while the previous flush was in flight, together."""
        try:
            while self._flush.items:
                batch, self._flush = self._flush, _Flush()
                try:
                    if not self.store.healthy:
                        raise ConnectionError("redis down")
                    await self._eval_many(scripts.SETTLE, batch.items)
                    self.stats.settle_batches += 1
                except REDIS_ERRORS as exc:
                    if self.store.healthy:
                        self.store.failed(exc)
                    self._parked.extend(batch.items)
                    self.stats.parked += len(batch.items)
                except Exception:  # a bug must not leave settlements waiting forever
                    log.exception("settlement flush failed")
                    self._parked.extend(batch.items)
                    self.stats.parked += len(batch.items)
                finally:
                    for w in batch.waiters:
                        if not w.done():
                            w.set_result(None)
        finally:
            self._flusher = None

    async def _recovered(self) -> None:
        """Redis answers again: push what the outage kept, then forget the local counters."""
        items = list(self._parked)
        for key, spent in self._outage_spend.items():
            items.append(_Pending([key], ["", 0, 0, spent, 0, "b"]))
        for start in range(0, len(items), 500):
            await self._eval_many(scripts.SETTLE, items[start : start + 500])
        self._parked.clear()
        if self._stale:
            with contextlib.suppress(_RebuildFailed):  # Postgres down too: kept for the next recovery
                await self._rebase_stale()
        for key, spent in self._outage_spend.items():
            self._spent[key] = self._spent.get(key, 0) + spent
        self._outage_spend.clear()
        self.local.counters = LocalCounters()

    # -- ledger commits and rebases ---------------------------------------------

    async def apply_committed(self, records: Sequence[UsageRecord], xid: str) -> None:
        """Move committed records' costs into their budget counters (the ledger writer calls this)."""
        items = [_Pending(list(r.budget_keys), [r.request_id, r.cost_micros, xid]) for r in records]
        if self.store.healthy:
            try:
                for start in range(0, len(items), 500):
                    await self._eval_many(scripts.APPLY, items[start : start + 500])
                self.stats.applied += len(items)
                return
            except REDIS_ERRORS as exc:
                self.store.failed(exc)
        # Not applied, or maybe applied with the reply lost: a retry could count a cost
        # twice.  The counters are rebased on the ledger instead once Redis answers.
        for r in records:
            for key in r.budget_keys:
                self._stale[key] = scope_of(key, r.user_id, r.key_id)
        self.stats.unapplied += len(records)

    async def _rebase(self, targets: Mapping[str, tuple[BudgetScope, int]]) -> int:
        """Reset counters to the ledger's spend (holds kept), exactly: MARK, read the ledger, SEED."""
        if not targets:
            return 0
        by_tag: dict[str, list[str]] = {}
        for key in targets:
            by_tag.setdefault(key[key.index("{") : key.index("}") + 1], []).append(key)  # one Cluster slot each
        token = os.urandom(8).hex()
        for group in by_tag.values():
            await self._eval(scripts.MARK, group, [token, _MARK_TTL_MS])
        keys_ = list(targets)
        ledger = await self._ledger_spend([targets[k][0] for k in keys_], "budget rebase failed")
        if not isinstance(ledger, LedgerSpend):
            return 0  # no ledger to rebase on (the mark lapses by itself)
        built = 0
        for group in by_tag.values():
            args: list[Any] = [os.urandom(8).hex(), ledger.snapshot, token]
            for key in group:
                scope, ttl = targets[key]
                args += (ledger.spent.get(scope, 0), ttl)
            built += int(await self._eval(scripts.SEED, group, args))
        self.stats.rebases += built
        return built

    async def _rebase_stale(self) -> None:
        stale, self._stale = self._stale, {}
        try:
            n = await self._rebase(stale)
        except BaseException:
            for key, v in stale.items():
                self._stale.setdefault(key, v)  # next time
            raise
        if n:
            log.info("budget counters rebased on the ledger after an outage", counters=n)

    async def _reconcile(self) -> None:
        """Every ``budget_reconcile_seconds``, rebase the counters this worker used meanwhile."""
        while True:
            await asyncio.sleep(self.reconcile_s)
            touched, self._touched = self._touched, {}
            if not self.store.healthy:
                continue
            items = list(touched.items())
            for start in range(0, len(items), 200):
                try:
                    await self._rebase(dict(items[start : start + 200]))
                except REDIS_ERRORS as exc:
                    self.store.failed(exc)
                    break
                except _RebuildFailed:
                    break

    # -- leases -----------------------------------------------------------------

    async def _renew_leases(self) -> None:
        """Extend the leases of requests still in flight; a dead worker's leases lapse."""
        interval = max(0.05, self.lease_ms / 3000.0)
        while True:
            await asyncio.sleep(interval)
            if not self._held or not self.store.healthy:
                continue
            items = [
                _Pending(list(h.plan.renew_keys), [h.member, self.lease_ms, *h.plan.renew_kinds])
                for h in self._held.values()
            ]
            try:
                for start in range(0, len(items), 500):
                    await self._eval_many(scripts.RENEW, items[start : start + 500])
            except REDIS_ERRORS as exc:
                self.store.failed(exc)

    async def close(self) -> None:
        if self._orphans:
            await asyncio.wait(set(self._orphans), timeout=2 * self.timeout + 1)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._flusher is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await asyncio.wait_for(asyncio.shield(self._flusher), timeout=2 * self.timeout + 1)
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self._stale and self.store.healthy:
            with contextlib.suppress(_RebuildFailed, *REDIS_ERRORS, TimeoutError):
                async with asyncio.timeout(2 * self.timeout + 2):
                    await self._rebase_stale()
        if self._stale or self._parked:
            # Reservations lapse by themselves; a counter missing a committed cost is
            # rebased on the ledger by the next worker's reconcile that uses it.
            log.warning(
                "redis unreachable at shutdown: settlements not sent, counters not rebased",
                settlements=len(self._parked), counters=len(self._stale),
            )
        await self.store.close()


class _RebuildFailed(Exception):
    """Budget counters could not be rebuilt: decide this request without Redis."""


def _amounts(ledger: LedgerSpend | Mapping[BudgetScope, int]) -> Mapping[BudgetScope, int]:
    return ledger.spent if isinstance(ledger, LedgerSpend) else ledger


def _scopes(plan: Plan, checks: list[Any]) -> list[BudgetScope]:
    """The ledger scopes (user, key or whole user, period) of a plan's budget checks."""
    return [BudgetScope(plan.user_id, plan.key_id if c.scope == "key" else None, c.period, c.since) for c in checks]
