"""Limiters behind admission: shared counters in Redis, or per-process counters.

``RedisLimiter.reserve`` makes one round trip: the versioned ADMIT script
checks every limit of the key and of its user (requests and tokens per
rolling minute, a concurrency lease, the budget at the request's worst-case
cost) and reserves all of them or none.  ``settle_later`` moves the
reservation to the real tokens and cost and releases the lease, off the hot
path and without a task per request: settlements are queued and sent
together, one SETTLE_MANY script call on the single-node fast connection (one
SETTLE per settlement, pipelined, through redis-py), and ``close`` sends what
is still queued.  On a busy worker the queue rides on the next ADMIT (written
just ahead of it: one round trip per request instead of two), or goes by a
timer at most ``SETTLE_WAIT_S`` later (one armed at a time, left to run out);
on a quiet one it goes in the next loop pass.  With a ledger
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
from operator import attrgetter, itemgetter
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
    FRACTION,
    SECONDS,
    Held,
    LimiterStats,
    Plan,
    Planner,
    decide,
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
# On a busy worker (at least BUSY_ADMITS_PER_S ADMITs a second lately) a settlement waits up to
# SETTLE_WAIT_S for the next ADMIT to ride on: one round trip (one write, one read) then carries both,
# the settlement first.  A lease, a token reservation and a budget hold are released at most that much
# later; a budget is never overshot (the hold stays until the settlement runs).  A quieter worker sends
# each loop pass's settlements at once, as before.
SETTLE_WAIT_S = 0.002
BUSY_ADMITS_PER_S = 200
_RATE_WINDOW_S = 0.1  # how often the ADMIT rate is looked at again
_SETTLE_MANY_ARGC = 5  # EVALSHA, sha, numkeys, hold_ms, lines (plus the keys)

# One queued settlement: plan, member, the reservation's second, tokens delta, actual cost.
_Settle = tuple[Plan, str, int, int, int]
_PLAN = itemgetter(0)  # of a _Settle (mapped in C over a batch: no Python call per settlement)
_SETTLE_N, _SETTLE_BULK = attrgetter("settle_n"), attrgetter("settle_bulk")

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
        self.planner = Planner(rc.key_prefix, self.lease_ms)
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
        self._settles: list[_Settle] = []  # queued for the next SETTLE_MANY
        self._settle_waiters: list[asyncio.Future[None]] = []  # ``settle`` callers waiting for that batch
        self._settle_reply: asyncio.Future[object] | None = None  # the last batch sent (replies come in order)
        self._settle_timer: asyncio.TimerHandle | None = None  # sends the queued settlements when no ADMIT came
        self._admits = 0  # ADMITs sent on the fast connection (the rate that decides whether settlements wait)
        self._rate_at = 0.0  # loop time of the last look at that rate, and the count then
        self._rate_admits = 0
        self._busy = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once seen (no getpid() per request)
        self._orphan = self._release_orphan  # bound once: handed with every ADMIT
        self._worst: dict[str, tuple[int, int]] = {}  # model -> worst-case prices per input and output token
        self._hold_args = (encode_parts(0), encode_parts(COMMIT_HOLD_MS))  # SETTLE_MANY's hold_ms: no ledger, ledger
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

    def _admit_command(self, plan: Plan, member: str, tokens: int, cost: int) -> bytes:
        m, t, c = member.encode(), b"%d" % tokens, b"%d" % cost
        return (plan.admit_head + b"$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(m), m, len(t), t, len(c), c)
                + plan.admit_tail)

    def _worst_prices(self, model: str) -> tuple[int, int]:
        """(per input token, per output token) of a reservation's worst case (``demand``), kept per model."""
        price = self.prices.lookup(model) or self.prices.default
        worst = (0, 0) if price is None else (max(price.input, price.cache_write), price.output)
        if len(self._worst) >= 10_000:  # bounded: clients choose the model names
            self._worst.clear()
        self._worst[model] = worst
        return worst

    async def _admit(self, plan: Plan, member: str, tokens: int, cost: int) -> Any:
        """ADMIT by the slower ways: connecting first, or through redis-py; EVAL after a NOSCRIPT."""
        fast = self.store.fast
        if fast is not None:
            reply = await fast.send_encoded(
                plan.admit_argc, self._admit_command(plan, member, tokens, cost),
                (self._orphan, Held(plan, member, 0, tokens, cost)) if plan.settle else None)
            try:
                return await reply
            except NoScriptError:
                pass
        return await self.runner.eval(scripts.ADMIT, plan.keys, (member, tokens, cost, self.lease_ms, *plan.args))

    def _release_orphan(self, held: Held, raw: Any) -> None:
        """An ADMIT whose caller went away: give back what it reserved (``held``: not yet its second)."""
        if raw[0] != 1:
            return
        held.sec = raw[1]
        self._queue_settle(held, 0, 0)

    # -- admission --------------------------------------------------------------

    async def reserve(self, principal: Principal, facts: RequestFacts) -> Reservation:
        """One ADMIT round trip; a straight line on the hot path (each coroutine layer costs calls)."""
        plan = self.planner.plan(principal, model=facts.model)
        if plan is None:
            return Reservation()
        if not self.store.healthy:
            return await self._degraded(plan, facts)
        # ``demand`` written out, with the model's worst-case prices looked up once per model.
        tokens = cost = 0
        if plan.demands:
            output = facts.choices * (facts.max_tokens or plan.output_cap or DEFAULT_OUTPUT_RESERVE)
            est_in = facts.body_len // 4 + 1
            if plan.token_i:
                tokens = est_in + output
                if tokens > plan.token_cap:
                    tokens = plan.token_cap
            if plan.budget_at:
                worst = self._worst.get(facts.model)
                if worst is None:
                    worst = self._worst_prices(facts.model)
                cost = est_in * worst[0] + output * worst[1]
        member = facts.request_id
        held = Held(plan, member, 0, tokens, cost) if plan.settle else None  # its second comes with the answer
        try:
            if self._settles:  # the queued settlements go first, in the same write (and read) as this ADMIT
                self._send_settles()
            fast = self.store.fast
            reply = None
            if fast is not None:
                # ADMIT on the fast connection, sent now (None: not connected yet).  A caller that goes
                # away mid-admission (client disconnect) cancels its wait: the reply then goes to
                # _release_orphan, which gives back whatever the script reserved.  (``_admit_command``
                # written out, behind the array header: no call of ours between here and the socket.)
                self._admits += 1
                m, t, c = member.encode(), b"%d" % tokens, b"%d" % cost
                reply = fast.send_command(
                    b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n%s" % (
                        plan.admit_start, len(m), m, len(t), t, len(c), c, plan.admit_tail),
                    None if held is None else (self._orphan, held))
            if reply is None:
                raw = await self._admit(plan, member, tokens, cost)
            else:
                try:
                    raw = await reply
                except NoScriptError:  # Redis lost its scripts (restarted): EVAL it
                    raw = await self.runner.eval(
                        scripts.ADMIT, plan.keys, (member, tokens, cost, self.lease_ms, *plan.args))
            if raw[0] == -1:
                await self.budgets.rebuild(plan)
                raw = await self._admit(plan, member, tokens, cost)
                if raw[0] == -1:
                    raise RebuildFailed
        except REDIS_ERRORS as exc:
            self.store.failed(exc)
            return await self._degraded(plan, facts)
        except RebuildFailed:
            return await self._degraded(plan, facts)
        # The reply is status, sec, failed, retry, then (used, reset) per check.  A budget's
        # used comes back as a decimal string (exact pico-dollars); the others are integers.
        status = raw[0]
        if plan.budget_at:
            spent = self.budgets.spent
            held_cost = cost if status else 0
            for at, key in plan.budget_at:
                spent[key] = int(raw[at]) - held_cost
        if status and plan.simple_headers:
            # Admitted (the usual answer): ``decide`` and ``rate_headers`` written out, read from the
            # reply in place; the limits' texts were formatted with the plan.
            self.stats.admitted += 1
            headers = {}
            at = plan.rate_at
            if at:
                left = plan.rate_limit - raw[at]
                ms = raw[at + 1]
                headers["x-ratelimit-limit-requests"] = plan.rate_limit_s
                headers["x-ratelimit-remaining-requests"] = f"{left if left > 0 else 0}"
                headers["x-ratelimit-reset-requests"] = (
                    SECONDS[ms // 1000] + FRACTION[ms % 1000] if 1000 <= ms < 60_000 else duration(ms))
            at = plan.token_at
            if at:
                left = plan.token_limit - raw[at]
                ms = raw[at + 1]
                headers["x-ratelimit-limit-tokens"] = plan.token_limit_s
                headers["x-ratelimit-remaining-tokens"] = f"{left if left > 0 else 0}"
                headers["x-ratelimit-reset-tokens"] = (
                    SECONDS[ms // 1000] + FRACTION[ms % 1000] if 1000 <= ms < 60_000 else duration(ms))
        else:
            used = raw[4::2]
            for i in plan.budget_i:
                used[i] = int(used[i])
            headers = decide(self.stats, plan, plan.limits, Decision(status, raw[1], raw[2], raw[3], used, raw[5::2]),
                             cost)  # raises the 429
        if held is not None:
            held.sec = raw[1]
            if plan.renew_keys:
                self._held[member] = held
                if self._renewer is None:
                    self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())
        if plan.budget_keys and self.budgets.ledger:
            if plan.budget_keys not in self.budgets.touched_plans:  # once per reconcile interval
                self.budgets.touch(plan)
            return Reservation(headers, held, plan.budget_keys)
        return Reservation(headers, held)

    async def _degraded(self, plan: Plan, facts: RequestFacts) -> Reservation:
        """The decision without Redis (``redis.failure_mode``); the record still names its budget counters."""
        self.stats.degraded += 1
        if self.mode == "open":
            res = Reservation()
        elif self.mode == "closed":
            raise GatewayError(
                ErrorKind.UNAVAILABLE, "The rate-limit store is unavailable; try again shortly.",
                retry_after_s=self.retry_seconds,
            )
        else:
            if any(key not in self.budgets.spent for key in plan.budget_keys):
                await self.budgets.learn_spend(plan)
            res = self.local.reserve_plan(plan, facts, budget_spent=self.budgets.spent)
        if plan.budget_keys and self.budgets.ledger:
            res.budget_keys = plan.budget_keys
            if plan.budget_keys not in self.budgets.touched_plans:
                self.budgets.touch(plan)
        return res

    # -- settlement -------------------------------------------------------------

    def settle_later(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation, tokens: int, cost_pico: int
    ) -> None:
        """Queue the settlement: sent with the next ADMIT, or by a timer ``SETTLE_WAIT_S`` later when
        none comes; ``close`` sends what is left.  ``_queue_settle`` written out for the usual case
        (shared counters): the handler's one call for the settlement."""
        held: Held = reservation.state  # type: ignore[assignment]  # checked next (no isinstance call)
        if held.__class__ is not Held:
            return
        if held.local:
            self._queue_settle(held, tokens, cost_pico)
            return
        plan = held.plan
        member = held.member
        if plan.budget_keys:  # Budgets.settled, written out
            spent = self.budgets.spent
            for key in plan.budget_keys:
                spent[key] = spent.get(key, 0) + cost_pico
        if plan.renew_keys:
            self._held.pop(member, None)
        self.stats.settles += 1
        if not self._settles:
            self._schedule_settles()
        self._settles.append((plan, member, held.sec, tokens - held.tokens, cost_pico))

    async def settle(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation, tokens: int, cost_pico: int
    ) -> None:
        """``settle_later``, then wait until Redis answered for it (or it was parked for Redis's return)."""
        held = reservation.state
        if isinstance(held, Held):
            await self._settle_held(held, tokens, cost_pico)

    async def _settle_held(self, held: Held, tokens: int, cost_pico: int) -> None:
        if self._queue_settle(held, tokens, cost_pico):
            asyncio.get_running_loop().call_soon(self._send_settles)  # awaited: no waiting for an ADMIT
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._settle_waiters.append(waiter)
            await waiter

    def _queue_settle(self, held: Held, tokens: int, cost_pico: int) -> bool:
        """Queue one settlement for this loop pass; False when there is nothing to send (local counters)."""
        plan = held.plan
        self.budgets.settled(plan, cost_pico, local=held.local)
        if held.local:
            self.local.release(held, tokens, cost_pico)
            return False
        self._held.pop(held.member, None)
        self.stats.settles += 1
        if not self._settles:
            self._schedule_settles()
        self._settles.append((plan, held.member, held.sec, tokens - held.tokens, cost_pico))
        return True

    def _schedule_settles(self) -> None:
        """A first settlement was queued: on a busy worker it rides on the next ADMIT (``reserve`` sends
        the queue first), else a timer sends it ``SETTLE_WAIT_S`` later; on a quiet one it goes at once."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._rate_at >= _RATE_WINDOW_S:
            self._busy = self._admits - self._rate_admits >= BUSY_ADMITS_PER_S * (now - self._rate_at)
            self._rate_at, self._rate_admits = now, self._admits
        if self._busy:
            # One timer at a time, left to run out when an ADMIT carried the queue first (cheaper than one
            # per batch, cancelled): a queue that meets an armed timer goes when it fires, sooner still.
            if self._settle_timer is None:
                self._settle_timer = loop.call_later(SETTLE_WAIT_S, self._settle_timer_fired)
        else:
            loop.call_soon(self._send_settles)

    def _settle_timer_fired(self) -> None:
        self._settle_timer = None
        self._send_settles()

    def _send_settles(self) -> None:
        """This loop pass's settlements: one SETTLE_MANY on the fast connection, else through the flusher."""
        items, self._settles = self._settles, []
        waiters, self._settle_waiters = self._settle_waiters, []
        if not items:  # sent already (by an ADMIT, flush_settlements)
            return
        fast = self.store.fast
        reply = None
        if fast is not None and self.store.healthy:
            # The member goes last on its line: a newline in it (never in the gateway's own ids) cannot be sent so.
            if len(items) == 1:  # the usual batch (each rides on the next ADMIT): no list, KEYS encoded with the plan
                p, m, sec, dtok, cost = items[0]
                body = f"{sec} {dtok} {cost} {p.settle_kinds} {m}".encode()
                if 10 not in body:
                    reply = fast.send_command(
                        b"%s%s$%d\r\n%s\r\n" % (p.settle_one, self._hold_args[self.budgets.ledger], len(body), body))
            else:
                lines = "\n".join([f"{sec} {dtok} {cost} {p.settle_kinds} {m}" for p, m, sec, dtok, cost in items])
                if lines.count("\n") + 1 == len(items):
                    plans = list(map(_PLAN, items))
                    nkeys = sum(map(_SETTLE_N, plans))
                    body = lines.encode()
                    reply = fast.send_now(
                        _SETTLE_MANY_ARGC + nkeys,
                        b"%s%s%s%s$%d\r\n%s\r\n" % (
                            scripts.SETTLE_MANY.head, b"$%d\r\n%d\r\n" % (len(f"{nkeys}"), nkeys),
                            b"".join(map(_SETTLE_BULK, plans)),
                            self._hold_args[self.budgets.ledger], len(body), body),
                    )
        if reply is None:  # not connected yet, Redis down, or redis-py: the flusher sends them one by one
            self._to_flusher(items, waiters)
            return
        self._settle_reply = reply
        reply.add_done_callback(functools.partial(self._settles_answered, items, waiters))

    def _settles_answered(self, items: list[_Settle], waiters: list[asyncio.Future[None]],
                          reply: asyncio.Future[object]) -> None:
        exc = reply.exception() if not reply.cancelled() else ConnectionError("settlement reply cancelled")
        if exc is None:
            self.stats.settle_batches += 1
        elif isinstance(exc, NoScriptError):  # Redis lost its scripts (restarted): nothing ran, EVAL them
            self._to_flusher(items, waiters)
            return
        else:
            if isinstance(exc, REDIS_ERRORS):
                self.store.failed(exc)
            else:  # a bug must not lose settlements
                log.error("settlement batch failed", error=type(exc).__name__)
            self._parked.extend(self._calls(items))
            self.stats.parked += len(items)
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _calls(self, items: list[_Settle]) -> list[Call]:
        hold_ms = COMMIT_HOLD_MS if self.budgets.ledger else 0
        return [Call(list(p.settle_keys), [m, sec, dtok, cost, hold_ms, *p.settle_kinds])
                for p, m, sec, dtok, cost in items]

    def _to_flusher(self, items: list[_Settle], waiters: list[asyncio.Future[None]]) -> None:
        self._flush.items.extend(self._calls(items))
        self._flush.waiters.extend(waiters)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_settlements())

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

    async def flush_settlements(self) -> None:
        """Send the queued settlements now and wait for the answers to everything sent so far."""
        if self._settles:
            self._send_settles()
        reply = self._settle_reply
        if reply is not None and not reply.done():
            # Replies come in order: the last one answers for all.  Its callback runs first (parks or re-queues).
            await asyncio.wait({reply}, timeout=2 * self.timeout + 1)
        if self._flusher is not None:  # what went the slower way (redis-py, not connected, NOSCRIPT)
            await asyncio.wait({self._flusher}, timeout=2 * self.timeout + 1)

    async def close(self) -> None:
        await self.flush_settlements()
        if self._settle_timer is not None:  # nothing left for it to send
            self._settle_timer.cancel()
            self._settle_timer = None
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
