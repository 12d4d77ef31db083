"""Budget counters in Redis kept equal to the usage ledger (Postgres is the truth for spend).

What ``RedisLimiter`` needs beyond admission for budgets:

- **rebuild**: a missing counter (Redis restarted empty, flushed, a new
  period) is built from the ledger before the budget is enforced again, with
  the Postgres snapshot it was read in (``rebuild``; single-flight per plan).
- **apply**: once the ledger writer commits usage records, their costs move
  from held into the counters, unless a counter's snapshot already saw the
  commit (``apply_committed``).  A commit that cannot reach Redis marks its
  counters stale instead of being retried (a lost reply could count it twice).
- **rebase**: stale counters are reset to the ledger's figure when Redis
  answers again, and every ``redis.budget_reconcile_seconds`` each worker
  rebases the counters it used (MARK, ledger read, SEED with the mark's
  token; holds of requests in flight are kept).
- **Redis down**: the local fallback starts a budget from the spend last seen
  in Redis, else from the ledger (``learn_spend``), never from zero.

The Lua side of all of it is in ``stores/redis_scripts.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from operator import attrgetter, itemgetter
from typing import Any

import structlog

from gateway import tasks
from gateway.accounting.record import UsageRecord
from gateway.policy.budget_rebuild import BudgetScope, LedgerSpend
from gateway.policy.plans import PLAN_CACHE_MAX, Check, LimiterStats, Plan, budget_scopes, scope_of
from gateway.stores import redis_scripts as scripts
from gateway.stores.redis import REDIS_ERRORS, RedisStore
from gateway.stores.resp import encode_parts
from gateway.stores.script_calls import Call, ScriptRunner

_BUDGET_KEYS = attrgetter("budget_keys")
_BULK, _COUNT = itemgetter(0), itemgetter(1)  # of a key set's (RESP bulk strings, count)

log = structlog.get_logger("limits")

RebuildHook = Callable[[Sequence[BudgetScope]], Awaitable[LedgerSpend | Mapping[BudgetScope, int] | None]]
# A settled cost waiting for its ledger commit is held at most this long (a
# Postgres outage longer than that releases it; the commit still applies it).
COMMIT_HOLD_MS = 3_600_000
_APPLY_CHUNK = 500  # records per APPLY_MANY (one script call keeps Redis busy for all of them)
_MARK_TTL_MS = 30_000  # a rebase not finished by then is abandoned (APPLY adds directly again)

Target = tuple[BudgetScope, int]  # a counter's ledger scope and TTL (seconds, 0 = none)


class RebuildFailed(Exception):
    """Budget counters could not be rebuilt: decide this request without Redis."""


class Budgets:
    def __init__(
        self, runner: ScriptRunner, store: RedisStore, stats: LimiterStats, hook: RebuildHook,
        *, timeout: float, retry_seconds: float, reconcile_seconds: float,
    ) -> None:
        self.runner = runner
        self.store = store
        self.stats = stats
        self.hook = hook
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.reconcile_s = reconcile_seconds
        self.ledger = False  # a ledger writer applies committed costs (attach_ledger)
        self.spent: dict[str, int] = {}  # budget key -> spend last seen in Redis
        self.outage_spend: dict[str, int] = {}  # budget key -> spent under local limits (no ledger)
        self.stale: dict[str, Target] = {}  # counters missing an application
        self._touched: dict[str, Target] = {}  # counters used since the last reconcile
        # The plans' budget_keys added to _touched since then (the hot path checks it: a lookup, not a call).
        self.touched_plans: set[tuple[str, ...]] = set()
        self._key_bulk: dict[tuple[str, ...], tuple[bytes, int]] = {}  # budget keys -> (RESP bulk strings, count)
        self._rebuilding: dict[tuple[str, ...], asyncio.Future[None]] = {}
        self._block_until = 0.0
        self._reconciler: asyncio.Task[None] | None = None

    def attach_ledger(self) -> None:
        """A ledger writer will call ``apply_committed`` for every committed record with budget keys."""
        self.ledger = True
        if self.reconcile_s > 0 and self._reconciler is None:
            self._reconciler = asyncio.get_running_loop().create_task(self._reconcile())

    def touch(self, plan: Plan) -> None:
        """The plan's counters were used: the next reconcile rebases them."""
        self._touched.update(plan.budget_targets)
        self.touched_plans.add(plan.budget_keys)

    # -- the ledger ---------------------------------------------------------------

    async def ledger_spend(self, scope_list: list[BudgetScope], failure_event: str) -> Any:
        """Ask the ledger for the scopes' spend; on any failure back off and raise RebuildFailed."""
        try:
            async with asyncio.timeout(max(1.0, 5 * self.timeout)):
                return await self.hook(scope_list)
        except Exception as exc:  # noqa: BLE001 - any ledger failure means the same: unknown spend
            self.stats.rebuild_failures += 1
            self._block_until = time.monotonic() + self.retry_seconds
            log.warning(failure_event, error=type(exc).__name__)
            raise RebuildFailed from None

    async def learn_spend(self, plan: Plan) -> None:
        """Redis is down and this worker never saw a budget's spend: ask the ledger, so no fresh budget."""
        if time.monotonic() < self._block_until:
            return
        checks = [plan.checks[i] for i in plan.budget_i if plan.checks[i].key not in self.spent]
        scope_list = scopes(plan, checks)
        try:
            ledger = await self.ledger_spend(scope_list, "budget spend unknown while redis is down")
        except RebuildFailed:
            return
        if ledger is not None:
            spent = amounts(ledger)
            for c, scope in zip(checks, scope_list, strict=True):
                self.spent[c.key] = spent.get(scope, 0)

    async def rebuild(self, plan: Plan) -> None:
        """Seed the plan's missing budget counters from the ledger (once per worker at a time)."""
        if time.monotonic() < self._block_until:
            raise RebuildFailed
        ident = plan.budget_keys
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
                fut.set_exception(RebuildFailed())
                fut.exception()  # marked retrieved: each waiter raises its own copy

    async def _seed(self, plan: Plan) -> None:
        checks = [plan.checks[i] for i in plan.budget_i]
        scope_list = scopes(plan, checks)
        # The ledger cannot tell: do not enforce a budget we cannot know.
        ledger = await self.ledger_spend(scope_list, "budget rebuild failed; local limits meanwhile")
        snapshot = ledger.snapshot if isinstance(ledger, LedgerSpend) else ""
        spent_by_scope = amounts(ledger) if ledger is not None else {}
        args: list[Any] = [os.urandom(8).hex(), snapshot, ""]
        for c, scope in zip(checks, scope_list, strict=True):
            if ledger is not None:
                spent = spent_by_scope.get(scope, 0)
            else:  # no ledger: the most this worker has seen spent (an upper bound, never a fresh budget)
                spent = self.spent.get(c.key, 0) + self.outage_spend.get(c.key, 0)
            args += (spent, c.ttl_s)
        created = await self.runner.eval(scripts.SEED, [c.key for c in checks], args)
        self.stats.rebuilds += int(created)
        if created:
            log.info("budget counters rebuilt", counters=int(created), from_ledger=ledger is not None)
        for c in checks:
            self.outage_spend.pop(c.key, None)

    # -- settled costs -------------------------------------------------------------

    def settled(self, plan: Plan, cost_pico: int, *, local: bool) -> None:
        if local:
            if not self.ledger:  # with a ledger, the commit applies it (apply_committed)
                for key in plan.budget_keys:
                    self.outage_spend[key] = self.outage_spend.get(key, 0) + cost_pico
            return
        for key in plan.budget_keys:
            self.spent[key] = self.spent.get(key, 0) + cost_pico

    def outage_items(self) -> list[Call]:
        """SETTLE calls adding what was spent under local limits (no ledger), for Redis's return."""
        return [Call([key], ["", 0, 0, spent, 0, "b"]) for key, spent in self.outage_spend.items()]

    async def recovered(self) -> None:
        """Redis answers again (the outage items were sent): rebase stale counters, forget outage spend."""
        if self.stale:
            with contextlib.suppress(RebuildFailed):  # Postgres down too: kept for the next recovery
                await self._rebase_stale()
        for key, spent in self.outage_spend.items():
            self.spent[key] = self.spent.get(key, 0) + spent
        self.outage_spend.clear()

    async def apply_committed(self, records: Sequence[UsageRecord], xid: str) -> None:
        """Move committed records' costs into their budget counters (the ledger writer calls this)."""
        if self.store.healthy:
            try:
                for start in range(0, len(records), _APPLY_CHUNK):
                    await self._apply(records[start : start + _APPLY_CHUNK], xid)
                self.stats.applied += len(records)
                return
            except REDIS_ERRORS as exc:
                self.store.failed(exc)
        # Not applied, or maybe applied with the reply lost: a retry could count a cost
        # twice.  The counters are rebased on the ledger instead once Redis answers.
        for r in records:
            for key in r.budget_keys:
                self.stale[key] = scope_of(key, r.user_id, r.key_id)
        self.stats.unapplied += len(records)

    async def _apply(self, records: Sequence[UsageRecord], xid: str) -> None:
        """One APPLY_MANY on the fast connection (one APPLY per record through redis-py)."""
        if self.store.fast is not None:
            # A few calls per batch, none per record: one comprehension (the lines), the rest mapped in C;
            # the encoded KEYS cached per key set.
            key_bulk = self._key_bulk
            if len(key_bulk) + len(records) > PLAN_CACHE_MAX:  # bounded (cleared before, never amid a batch)
                key_bulk.clear()
            key_sets = list(map(_BUDGET_KEYS, records))
            for ks in set(key_sets).difference(key_bulk):  # usually none: a batch's keys were seen before
                key_bulk[ks] = (encode_parts(*ks), len(ks))
            hits = list(map(key_bulk.__getitem__, key_sets))
            lines = "\n".join([f"{hit[1]} {r.cost_pico} {r.request_id}" for hit, r in zip(hits, records, strict=True)])
            if lines.count("\n") + 1 == len(records):  # the member ends its line: never a newline in the gateway's ids
                await self.runner.eval_encoded(scripts.APPLY_MANY, sum(map(_COUNT, hits)),
                                               b"".join(map(_BULK, hits)), (xid, lines))
                return
        items = [Call(list(r.budget_keys), [r.request_id, r.cost_pico, xid]) for r in records]
        await self.runner.eval_many(scripts.APPLY, items)

    # -- rebases ---------------------------------------------------------------------

    async def rebase(self, targets: Mapping[str, Target]) -> int:
        """Reset counters to the ledger's spend (holds kept), exactly: MARK, read the ledger, SEED."""
        if not targets:
            return 0
        by_tag: dict[str, list[str]] = {}
        for key in targets:
            by_tag.setdefault(key[key.index("{") : key.index("}") + 1], []).append(key)  # one Cluster slot each
        token = os.urandom(8).hex()
        for group in by_tag.values():
            await self.runner.eval(scripts.MARK, group, [token, _MARK_TTL_MS])
        failed = False
        try:
            ledger = await self.ledger_spend([t[0] for t in targets.values()], "budget rebase failed")
        except RebuildFailed:
            ledger, failed = None, True
        if not isinstance(ledger, LedgerSpend):
            # No ledger answer: unmark now, so that the costs queued meanwhile count at once.
            for group in by_tag.values():
                await self.runner.eval(scripts.UNMARK, group, [token])
            if failed:
                raise RebuildFailed
            return 0
        built = 0
        for group in by_tag.values():
            args: list[Any] = [os.urandom(8).hex(), ledger.snapshot, token]
            for key in group:
                scope, ttl = targets[key]
                args += (ledger.spent.get(scope, 0), ttl)
            built += int(await self.runner.eval(scripts.SEED, group, args))
        self.stats.rebases += built
        return built

    async def _rebase_stale(self) -> None:
        stale, self.stale = self.stale, {}
        try:
            n = await self.rebase(stale)
        except BaseException:
            for key, target in stale.items():
                self.stale.setdefault(key, target)  # next time
            raise
        if n:
            log.info("budget counters rebased on the ledger after an outage", counters=n)

    async def _reconcile(self) -> None:
        """Every ``budget_reconcile_seconds``, rebase the counters this worker used meanwhile."""
        while True:
            await asyncio.sleep(self.reconcile_s)
            touched, self._touched = self._touched, {}
            self.touched_plans = set()
            if not self.store.healthy:
                continue
            items = list(touched.items())
            for start in range(0, len(items), 200):
                try:
                    await self.rebase(dict(items[start : start + 200]))
                except REDIS_ERRORS as exc:
                    self.store.failed(exc)
                    break
                except RebuildFailed:
                    break

    async def close(self) -> None:
        await tasks.stop(self._reconciler)
        if self.stale and self.store.healthy:
            with contextlib.suppress(RebuildFailed, *REDIS_ERRORS, TimeoutError):
                async with asyncio.timeout(2 * self.timeout + 2):
                    await self._rebase_stale()


def amounts(ledger: LedgerSpend | Mapping[BudgetScope, int]) -> Mapping[BudgetScope, int]:
    return ledger.spent if isinstance(ledger, LedgerSpend) else ledger


def scopes(plan: Plan, checks: Sequence[Check]) -> list[BudgetScope]:
    """The ledger scopes (user, key or whole user, period) of a plan's budget checks."""
    return budget_scopes(plan.user_id, plan.key_id, plan.team_id, checks)
