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
lapse by themselves when their worker dies.  Budget counters' upkeep
(rebuild, apply, rebase) is ``policy/budgets.py``; script calls are
``stores/script_calls.py``.

``LocalLimiter`` (``policy/local.py``) runs the same arithmetic in process
memory: the standalone mode's limiter, and the fallback while Redis is
unreachable (``redis.failure_mode = "local"``), where each worker takes its
share (1 / (workers x instances)) of every limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.exceptions import NoScriptError

from gateway import tasks
from gateway.accounting.pricing import PriceTable
from gateway.accounting.record import UsageRecord
from gateway.config import Config
from gateway.errors import ErrorKind, GatewayError
from gateway.policy.admit import RequestFacts, Reservation
from gateway.policy.budgets import COMMIT_HOLD_MS, Budgets, RebuildFailed, RebuildHook
from gateway.policy.local import LocalLimiter
from gateway.policy.plans import (
    DEFAULT_OUTPUT_RESERVE,
    PLAN_CACHE_MAX,
    Held,
    LimiterStats,
    Plan,
    Planner,
    decide,
    demand,
    duration,
)
from gateway.policy.principals import Principal
from gateway.policy.windows import Decision, LocalCounters
from gateway.stores import redis_scripts as scripts
from gateway.stores.redis import REDIS_ERRORS, RedisStore
from gateway.stores.resp import encode_parts
from gateway.stores.script_calls import Call, ScriptRunner

log = structlog.get_logger("limits")

_PARKED_MAX = 100_000

__all__ = ["DEFAULT_OUTPUT_RESERVE", "LocalLimiter", "RebuildHook", "RedisLimiter", "duration"]


@dataclass(slots=True)
class _Flush:
    items: list[Call] = field(default_factory=list)
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
        self.mode = rc.failure_mode
        self.retry_seconds = rc.retry_seconds
        self.timeout = rc.timeout_ms / 1000.0
        self.lease_ms = int(rc.lease_seconds * 1000)
        self.planner = Planner(rc.key_prefix)
        self.local = LocalLimiter(prices, share=share, prefix=rc.key_prefix)
        self.stats = LimiterStats()
        self.runner = ScriptRunner(store, self.timeout)
        self.budgets = Budgets(
            self.runner, store, self.stats, rebuild, timeout=self.timeout, retry_seconds=rc.retry_seconds,
            reconcile_seconds=rc.budget_reconcile_seconds,
        )
        self._held: dict[str, Held] = {}  # request id -> leases and budget reservations held in Redis
        self._flush = _Flush()
        self._flusher: asyncio.Task[None] | None = None
        self._parked: deque[Call] = deque(maxlen=_PARKED_MAX)
        self._heads: dict[tuple[int, str], tuple[Plan, bytes]] = {}
        self._orphans: set[asyncio.Task[None]] = set()
        self._tails: dict[int, tuple[Plan, bytes]] = {}
        self._renewer: asyncio.Task[None] | None = None
        store.on_recover(self._recovered)

    @property
    def rebuild(self) -> RebuildHook:
        """How budget counters learn the ledger's spend (``budget_rebuild.rebuild_budgets`` in the app)."""
        return self.budgets.hook

    @rebuild.setter
    def rebuild(self, hook: RebuildHook) -> None:
        self.budgets.hook = hook

    def attach_ledger(self) -> None:
        """A ledger writer commits usage: budgets hold settled costs until ``apply_committed``."""
        self.budgets.attach_ledger()

    async def apply_committed(self, records: Sequence[UsageRecord], xid: str) -> None:
        await self.budgets.apply_committed(records, xid)

    @property
    def degraded(self) -> bool:
        return not self.store.healthy

    async def start(self, timeout: float = 2.0) -> None:
        """Connect and load the scripts before traffic (the first request pays no NOSCRIPT round trip)."""
        await self.runner.load_all(timeout)

    # -- redis calls ------------------------------------------------------------

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
            return await self.runner.eval(scripts.ADMIT, plan.keys, (member, tokens, cost, self.lease_ms, *plan.args))
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
            return await self.runner.eval(scripts.ADMIT, plan.keys, (member, tokens, cost, self.lease_ms, *plan.args))

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

    # -- admission --------------------------------------------------------------

    async def reserve(self, principal: Principal, facts: RequestFacts) -> Reservation:
        plan = self.planner.plan(principal, model=facts.model)
        if plan is None:
            return Reservation()
        res = await self._reserve(plan, facts)
        if self.budgets.ledger and plan.budget_keys:
            res.budget_keys = plan.budget_keys
            self.budgets.touch(plan)
        return res

    async def _reserve(self, plan: Plan, facts: RequestFacts) -> Reservation:
        if not self.store.healthy:
            return await self._degraded(plan, facts)
        limits = plan.limits
        token_cap = min((limits[i] for i in plan.token_i), default=0)
        tokens, cost = demand(plan, facts, self.prices, token_cap)
        try:
            raw = await self._admit(plan, facts.request_id, tokens, cost)
            if raw[0] == -1:
                await self.budgets.rebuild(plan)
                raw = await self._admit(plan, facts.request_id, tokens, cost)
                if raw[0] == -1:
                    raise RebuildFailed
        except REDIS_ERRORS as exc:
            self.store.failed(exc)
            return await self._degraded(plan, facts)
        except RebuildFailed:
            return await self._degraded(plan, facts)
        n = len(plan.checks)
        # A budget's used comes back as a decimal string (exact pico-dollars): int() reads both.
        d = Decision(raw[0], raw[1], raw[2], raw[3], [int(u) for u in raw[4 : 4 + 2 * n : 2]],
                     list(raw[5 : 5 + 2 * n : 2]))
        for i in plan.budget_i:
            self.budgets.spent[plan.checks[i].key] = d.used[i] - (cost if d.status else 0)
        headers = decide(self.stats, plan, limits, d, cost)
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
        if any(key not in self.budgets.spent for key in plan.budget_keys):
            await self.budgets.learn_spend(plan)
        return self.local.reserve_plan(plan, facts, budget_spent=self.budgets.spent)

    # -- settlement -------------------------------------------------------------

    async def settle(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation, tokens: int, cost_pico: int
    ) -> None:
        held = reservation.state
        if isinstance(held, Held):
            await self._settle_held(held, tokens, cost_pico)

    async def _settle_held(self, held: Held, tokens: int, cost_pico: int) -> None:
        plan = held.plan
        self.budgets.settled(plan, cost_pico, local=held.local)
        if held.local:
            self.local.release(held, tokens, cost_pico)
            return
        self._held.pop(held.member, None)
        keys = plan.settle_keys
        hold_ms = COMMIT_HOLD_MS if self.budgets.ledger else 0
        args: list[Any] = [held.member, held.sec, tokens - held.tokens, cost_pico, hold_ms]
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
                    await self.runner.eval(scripts.SETTLE, keys, args)
            except REDIS_ERRORS as exc:
                self.store.failed(exc)
                self._parked.append(Call(list(keys), args))
                self.stats.parked += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush.items.append(Call(list(keys), args))
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
                    await self.runner.eval_many(scripts.SETTLE, batch.items)
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
        await self.runner.eval_chunked(scripts.SETTLE, [*self._parked, *self.budgets.outage_items()])
        self._parked.clear()
        await self.budgets.recovered()
        self.local.counters = LocalCounters()

    # -- leases -----------------------------------------------------------------

    async def _renew_leases(self) -> None:
        """Extend the leases of requests still in flight; a dead worker's leases lapse."""
        interval = max(0.05, self.lease_ms / 3000.0)
        while True:
            await asyncio.sleep(interval)
            if not self._held or not self.store.healthy:
                continue
            items = [
                Call(list(h.plan.renew_keys), [h.member, self.lease_ms, *h.plan.renew_kinds])
                for h in self._held.values()
            ]
            try:
                await self.runner.eval_chunked(scripts.RENEW, items)
            except REDIS_ERRORS as exc:
                self.store.failed(exc)

    async def close(self) -> None:
        if self._orphans:
            await asyncio.wait(set(self._orphans), timeout=2 * self.timeout + 1)
        await tasks.stop(self._renewer)
        if self._flusher is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await asyncio.wait_for(asyncio.shield(self._flusher), timeout=2 * self.timeout + 1)
        await self.budgets.close()
        if self.budgets.stale or self._parked:
            # Reservations lapse by themselves; a counter missing a committed cost is
            # rebased on the ledger by the next reconcile of a worker that uses it.
            log.warning(
                "redis unreachable at shutdown: settlements not sent, counters not rebased",
                settlements=len(self._parked), counters=len(self.budgets.stale),
            )
        await self.store.close()
