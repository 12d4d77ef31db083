"""Limiters behind admission: shared counters in Redis, or per-process counters.

``RedisLimiter.reserve`` makes one round trip: the versioned ADMIT script
checks every limit of the key and of its user (requests and tokens per
rolling minute, a concurrency lease, the budget at the request's worst-case
cost) and reserves all of them or none.  ``settle`` moves the reservation to
the real tokens and cost and releases the lease; settlements are queued and
sent together (one pipeline per flush), off the hot path.

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
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any, Literal

import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from gateway.accounting.pricing import PriceTable
from gateway.config import Config, Limits
from gateway.errors import ErrorKind, GatewayError
from gateway.policy.admit import RequestFacts, Reservation
from gateway.policy.budget_rebuild import BudgetScope
from gateway.policy.principals import Principal
from gateway.policy.windows import Decision, LocalCounters
from gateway.stores import redis_scripts as scripts
from gateway.stores.redis import REDIS_ERRORS, RedisStore
from gateway.stores.resp import encode_parts

log = structlog.get_logger("limits")

# Output tokens reserved when neither the request nor a limit caps max_tokens.
DEFAULT_OUTPUT_RESERVE = 4096
_DAY = 86_400
_PLAN_CACHE_MAX = 50_000
_PARKED_MAX = 100_000
_SAFE_ID = re.compile(r"[A-Za-z0-9_.@:-]{1,100}")

Period = Literal["day", "month", "total"]
RebuildHook = Callable[[Sequence[BudgetScope]], Awaitable[Mapping[BudgetScope, int] | None]]


def _tag(value: str) -> str:
    """An id safe inside a key name and its ``{...}`` hash tag."""
    return value if _SAFE_ID.fullmatch(value) else "h" + sha256(value.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class Check:
    """One counter a request must pass: kind ``r``/``t``/``c``/``b`` of the key or of its user."""

    kind: str
    scope: Literal["key", "user"]
    limit: int  # requests, tokens, leases or micro-dollars
    key: str  # the counter's name in Redis (and in local memory)
    period: Period = "total"
    since: float = 0.0
    ttl_s: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """Every check of one principal in one period, ready for the script."""

    user_id: str
    key_id: str
    checks: tuple[Check, ...]
    keys: tuple[str, ...]
    args: tuple[str | int, ...]  # kind, limit per check: ADMIT's ARGV tail
    limits: tuple[int, ...]
    rate_i: tuple[int, ...]
    token_i: tuple[int, ...]
    budget_i: tuple[int, ...]
    settle: tuple[int, ...]  # indices of t, c and b checks
    settle_keys: tuple[str, ...]
    lease_keys: tuple[str, ...]
    output_cap: int  # the lowest max_tokens limit, 0 when none


@dataclass(frozen=True, slots=True)
class _PeriodKeys:
    day: tuple[str, float, int]  # (id, since, ttl_s)
    month: tuple[str, float, int]


def _periods(day: int) -> _PeriodKeys:
    d = datetime.fromtimestamp(day * _DAY, UTC)
    month_start = datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()
    return _PeriodKeys(
        day=(d.strftime("d%Y%m%d"), float(day * _DAY), 2 * _DAY),
        month=(d.strftime("m%Y%m"), month_start, 33 * _DAY),
    )


class Planner:
    """Principal -> Plan, cached by identity (resolvers hand out the same object)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = f"{prefix}:{scripts.VERSION}"
        self._cache: dict[int, tuple[Principal, int, Plan | None]] = {}
        self._periods: tuple[int, _PeriodKeys] | None = None

    def plan(self, principal: Principal, now: float | None = None) -> Plan | None:
        day = int((time.time() if now is None else now) // _DAY)
        hit = self._cache.get(id(principal))
        if hit is not None and hit[0] is principal and hit[1] == day:
            return hit[2]
        plan = self._build(principal, day)
        if len(self._cache) >= _PLAN_CACHE_MAX:
            self._cache.clear()
        self._cache[id(principal)] = (principal, day, plan)
        return plan

    def _period(self, day: int) -> _PeriodKeys:
        if self._periods is None or self._periods[0] != day:
            self._periods = (day, _periods(day))
        return self._periods[1]

    def _build(self, p: Principal, day: int) -> Plan | None:
        base = f"{self.prefix}:{{u:{_tag(p.user_id)}}}"
        scopes: tuple[tuple[Literal["key", "user"], str, Limits], ...] = (
            ("key", f"k:{_tag(p.key_id)}", p.key_limits),
            ("user", "u", p.user_limits),
        )
        checks: list[Check] = []
        for kind, attr in (("r", "rpm"), ("t", "tpm"), ("c", "max_concurrency")):
            for scope, sid, limits in scopes:
                value = getattr(limits, attr)
                if value is not None:
                    checks.append(Check(kind, scope, int(value), f"{base}:{kind}:{sid}"))
        for scope, sid, limits in scopes:
            if limits.budget_usd is None:
                continue
            period = limits.budget_period
            if period == "total":
                pid, since, ttl = "all", 0.0, 0
            else:
                pid, since, ttl = getattr(self._period(day), period)
            micros = round(limits.budget_usd * 1_000_000)
            checks.append(Check("b", scope, micros, f"{base}:b:{sid}:{pid}", period, since, ttl))
        caps = [lim.max_tokens for _, _, lim in scopes if lim.max_tokens is not None]
        if not checks:
            return None
        args: list[str | int] = []
        for c in checks:
            args += (c.kind, c.limit)
        return Plan(
            user_id=p.user_id,
            key_id=p.key_id,
            checks=tuple(checks),
            keys=tuple(c.key for c in checks),
            args=tuple(args),
            limits=tuple(c.limit for c in checks),
            rate_i=tuple(i for i, c in enumerate(checks) if c.kind == "r"),
            token_i=tuple(i for i, c in enumerate(checks) if c.kind == "t"),
            budget_i=tuple(i for i, c in enumerate(checks) if c.kind == "b"),
            settle=tuple(i for i, c in enumerate(checks) if c.kind != "r"),
            settle_keys=tuple(c.key for c in checks if c.kind != "r"),
            lease_keys=tuple(c.key for c in checks if c.kind == "c"),
            output_cap=min(caps) if caps else 0,
        )


# --------------------------------------------------------------------------- shared pieces


@dataclass(slots=True)
class Held:
    """What an admitted request holds until it settles (``Reservation.state``)."""

    plan: Plan
    member: str
    sec: int
    tokens: int
    cost: int
    gens: tuple[bytes, ...] = ()  # one per budget check (Redis only)
    local: bool = False


@dataclass(slots=True)
class LimiterStats:
    """Counters for the metrics code (read them; never reset)."""

    admitted: int = 0
    rate_limited: int = 0
    budget_exceeded: int = 0
    degraded: int = 0  # decisions taken without Redis (local, open or closed)
    rebuilds: int = 0  # budget counters rebuilt from the ledger
    rebuild_failures: int = 0
    settles: int = 0
    settle_batches: int = 0  # round trips that carried them
    parked: int = 0  # settlements kept for when Redis answers again


def demand(plan: Plan, facts: RequestFacts, prices: PriceTable, token_cap: int) -> tuple[int, int]:
    """(tokens, micro-dollars) to reserve: estimated input + the output cap, worst-case priced."""
    if not plan.token_i and not plan.budget_i:
        return 0, 0
    output = facts.max_tokens or plan.output_cap or DEFAULT_OUTPUT_RESERVE
    est_in = facts.est_input_tokens
    tokens = min(est_in + output, token_cap) if plan.token_i else 0
    cost = 0
    if plan.budget_i:
        price = prices.lookup(facts.model) or prices.default
        cost = price.worst_case_micros(est_in, output) if price is not None else 0
    return tokens, cost


def duration(ms: int) -> str:
    """OpenAI's reset format: ``250ms``, ``1.5s``, ``1m0s``."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    if ms < 60_000:
        return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(ms, 60_000)
    return f"{minutes}m" + f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"


def _trio(
    out: dict[str, str], what: str, idx: tuple[int, ...], limits: Sequence[int], used: Sequence[int],
    reset: Sequence[int],
) -> None:
    best = idx[0] if len(idx) == 1 else min(idx, key=lambda i: limits[i] - used[i])
    out[f"x-ratelimit-limit-{what}"] = str(limits[best])
    out[f"x-ratelimit-remaining-{what}"] = str(max(0, limits[best] - used[best]))
    out[f"x-ratelimit-reset-{what}"] = duration(reset[best])


def rate_headers(plan: Plan, limits: Sequence[int], d: Decision) -> dict[str, str]:
    """``x-ratelimit-*`` for the tightest request and token limits of this request."""
    out: dict[str, str] = {}
    if plan.rate_i:
        _trio(out, "requests", plan.rate_i, limits, d.used, d.reset)
    if plan.token_i:
        _trio(out, "tokens", plan.token_i, limits, d.used, d.reset)
    return out


_PERIOD_WORD = {"day": "daily", "month": "monthly", "total": "total"}


def rejection(plan: Plan, limits: Sequence[int], d: Decision, cost: int, headers: dict[str, str]) -> GatewayError:
    i = d.failed - 1
    check = plan.checks[i]
    who = "API key" if check.scope == "key" else "user"
    if check.kind == "b":
        left = max(0, limits[i] - d.used[i])
        return GatewayError(
            ErrorKind.BUDGET_EXCEEDED,
            f"Budget exhausted: this {who}'s {_PERIOD_WORD[check.period]} budget of ${check.limit / 1e6:.2f} has "
            f"${left / 1e6:.4f} left and this request could cost up to ${cost / 1e6:.4f}.",
            headers=headers,
        )
    retry_s = d.retry_ms / 1000.0 if d.retry_ms > 0 else 1.0
    if check.kind == "c":
        msg = f"Too many concurrent requests: at most {limits[i]} in flight for this {who}."
    elif check.kind == "r":
        msg = f"Rate limit reached: {limits[i]} requests per minute for this {who}."
    else:
        msg = f"Rate limit reached: {limits[i]} tokens per minute for this {who}."
    return GatewayError(ErrorKind.RATE_LIMITED, msg, retry_after_s=retry_s, headers=headers)


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
            if len(self._limits) >= _PLAN_CACHE_MAX:
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
        self._loaded = False
        store.on_recover(self._recovered)

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
        if len(self._heads) >= _PLAN_CACHE_MAX:
            self._heads.clear()
        self._heads[cache_key] = (plan, head)
        return head

    async def _admit(self, plan: Plan, member: str, tokens: int, cost: int) -> Any:
        fast = self.store.fast
        if fast is None:
            return await self._eval(scripts.ADMIT, plan.keys, (member, tokens, cost, self.lease_ms, *plan.args))
        tail = self._tails.get(id(plan))
        if tail is None or tail[0] is not plan:
            if len(self._tails) >= _PLAN_CACHE_MAX:
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
        n = len(plan.checks)
        held = Held(plan, member, raw[1], tokens, cost, tuple(raw[4 + 2 * n :]))
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
        if not self.store.healthy:
            return self._degraded(plan, facts)
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
            return self._degraded(plan, facts)
        except _RebuildFailed:
            return self._degraded(plan, facts)
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
        held = Held(plan, facts.request_id, d.sec, tokens, cost, tuple(raw[4 + 2 * n :]))
        if plan.lease_keys:
            self._held[held.member] = held
            if self._renewer is None:
                self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())
        return Reservation(headers=headers, state=held)

    def _degraded(self, plan: Plan, facts: RequestFacts) -> Reservation:
        self.stats.degraded += 1
        if self.mode == "open":
            return Reservation()
        if self.mode == "closed":
            raise GatewayError(
                ErrorKind.UNAVAILABLE, "The rate-limit store is unavailable; try again shortly.",
                retry_after_s=self.retry_seconds,
            )
        return self.local.reserve_plan(plan, facts, budget_spent=self._spent)

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
        scopes = [
            BudgetScope(plan.user_id, plan.key_id if c.scope == "key" else None, c.period, c.since) for c in checks
        ]
        try:
            async with asyncio.timeout(max(1.0, 5 * self.timeout)):
                ledger = await self.rebuild(scopes)
        except Exception as exc:  # noqa: BLE001 - any ledger failure means the same: unknown spend
            # The ledger cannot tell: do not enforce a budget we cannot know.
            self.stats.rebuild_failures += 1
            self._rebuild_block_until = time.monotonic() + self.retry_seconds
            log.warning("budget rebuild failed; local limits meanwhile", error=type(exc).__name__)
            raise _RebuildFailed from None
        args: list[Any] = [os.urandom(8).hex()]
        for c, scope in zip(checks, scopes, strict=True):
            if ledger is not None:
                spent = ledger.get(scope, 0)
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
            for i in held.plan.budget_i:
                key = held.plan.checks[i].key
                self._outage_spend[key] = self._outage_spend.get(key, 0) + cost_micros
            return
        self._held.pop(held.member, None)
        plan = held.plan
        for i in plan.budget_i:
            key = plan.checks[i].key
            self._spent[key] = self._spent.get(key, 0) + cost_micros
        keys = plan.settle_keys
        args: list[Any] = [held.member, held.sec, tokens - held.tokens, held.cost, cost_micros]
        gens = iter(held.gens)
        for i in plan.settle:
            kind = plan.checks[i].kind
            args += (kind, next(gens, b"") if kind == "b" else b"")
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
            items.append(_Pending([key], ["", 0, 0, 0, spent, "b", b""]))
        for start in range(0, len(items), 500):
            await self._eval_many(scripts.SETTLE, items[start : start + 500])
        self._parked.clear()
        for key, spent in self._outage_spend.items():
            self._spent[key] = self._spent.get(key, 0) + spent
        self._outage_spend.clear()
        self.local.counters = LocalCounters()

    # -- leases -----------------------------------------------------------------

    async def _renew_leases(self) -> None:
        """Extend the leases of requests still in flight; a dead worker's leases lapse."""
        interval = max(0.05, self.lease_ms / 3000.0)
        while True:
            await asyncio.sleep(interval)
            if not self._held or not self.store.healthy:
                continue
            items = [_Pending(list(h.plan.lease_keys), [h.member, self.lease_ms]) for h in self._held.values()]
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
        await self.store.close()


class _RebuildFailed(Exception):
    """Budget counters could not be rebuilt: decide this request without Redis."""
