"""Plans: which counters a principal's request must pass, and what an answer looks like.

A ``Plan`` lists every check of one principal (key and user limits) in one
budget period, with its counter names, ready for the Redis script or the
local counters; ``demand`` prices a request's reservation; ``rate_headers``
and ``rejection`` turn a decision into ``x-ratelimit-*`` headers and the 429.
Both limiters (``policy/limits.py``) share all of it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from typing import Literal, cast

from gateway.accounting.money import usd, usd_to_pico_floor
from gateway.accounting.pricing import PriceTable
from gateway.config import Limits, model_matches
from gateway.errors import ErrorKind, GatewayError
from gateway.policy.admit import RequestFacts
from gateway.policy.budget_rebuild import BudgetScope
from gateway.policy.principals import Principal
from gateway.policy.windows import Decision
from gateway.stores import redis_scripts as scripts
from gateway.stores.resp import encode_parts

# Output tokens reserved when neither the request nor a limit caps max_tokens.
DEFAULT_OUTPUT_RESERVE = 4096
_DAY = 86_400
PLAN_CACHE_MAX = 50_000
_SAFE_ID = re.compile(r"[A-Za-z0-9_.@:-]{1,100}")

Period = Literal["day", "month", "total"]


def _tag(value: str) -> str:
    """An id safe inside a key name and its ``{...}`` hash tag."""
    return value if _SAFE_ID.fullmatch(value) else "h" + sha256(value.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class Check:
    """One counter a request must pass: kind ``r``/``t``/``c``/``b`` of the key or of its user."""

    kind: str
    scope: Literal["key", "user", "team"]
    limit: int  # requests, tokens, leases or pico-dollars
    key: str  # the counter's name in Redis (and in local memory)
    period: Period = "total"
    since: float = 0.0
    ttl_s: int = 0
    model: str | None = None  # a team's per-model budget: the model name or glob it covers


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
    renew_keys: tuple[str, ...]  # concurrency leases and budget reservations: renewed while in flight
    renew_kinds: tuple[str, ...]
    budget_keys: tuple[str, ...]
    output_cap: int  # the lowest max_tokens limit, 0 when none
    team_id: str | None = None  # set when the principal's user is in a team
    # Derived once per plan for the hot path (the fast Redis connection's commands, headers):
    token_cap: int = 0  # the lowest tokens-per-minute limit (0: none)
    admit_head: bytes = b""  # ``EVALSHA <ADMIT> n keys...`` as RESP bulk strings
    admit_tail: bytes = b""  # ADMIT's ARGV after member, tokens, cost: lease_ms, then kind, limit per check
    admit_argc: int = 0  # the ADMIT command's length: EVALSHA, sha, numkeys, keys, member, tokens, cost, lease, args
    admit_start: bytes = b""  # admit_head behind the command's array header (``*<argc>``): sent as it is
    settle_bulk: bytes = b""  # settle_keys as RESP bulk strings (SETTLE_MANY's KEYS for one request)
    settle_kinds: str = ""  # the kind letter of each settle key
    settle_n: int = 0  # len(settle_keys)
    settle_one: bytes = b""  # SETTLE_MANY for this plan alone up to its ARGV: array header, EVALSHA, sha, KEYS
    budget_targets: tuple[tuple[str, tuple[BudgetScope, int]], ...] = ()  # budget key -> (ledger scope, TTL s)
    rate_best: int = -1  # the only request-rate check (-1: none, or several: the tightest is picked per answer)
    token_best: int = -1  # the same for tokens per minute
    # ADMIT's reply read in place (``RedisLimiter.reserve``): where each figure sits in it, and the constant parts.
    demands: bool = False  # a token or budget check: the request's tokens and cost are estimated (``demand``)
    simple_headers: bool = False  # at most one check of each kind with headers (r, t): no choosing per answer
    rate_at: int = 0  # the rate check's used in the reply (its reset follows; 0: no rate check)
    rate_limit: int = 0
    rate_limit_s: str = ""  # its limit as the header's text, formatted once
    token_at: int = 0  # the same for tokens per minute
    token_limit: int = 0
    token_limit_s: str = ""
    budget_at: tuple[tuple[int, str], ...] = ()  # (the budget check's used in the reply, its counter)


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


def scope_of(key: str, user_id: str, key_id: str) -> tuple[BudgetScope, int]:
    """The ledger scope and TTL of a budget counter named by ``Planner`` (its period id is its last part)."""
    pid = key.rsplit(":", 1)[1]
    # "<prefix>:<version>:{u:<tag>}:b:u:<pid>" or "...}:b:k:<tag>:<pid>"; tags never hold braces.
    # A team member's counters carry the team's tag "{t:<team id>}"; its team budget is "...}:b:t:<pid>".
    # A team's per-model budget is "...}:b:tm:<hex of the model glob>:<pid>".
    kind = key[key.index("}:b:") + 4 :]
    scope_key = None if kind.startswith(("u:", "t:", "tm:")) else key_id
    team = key[key.index("{t:") + 3 : key.index("}")] if kind.startswith(("t:", "tm:")) else None
    model = bytes.fromhex(kind.split(":", 2)[1]).decode() if kind.startswith("tm:") else None
    if pid == "all":
        return BudgetScope(user_id, scope_key, "total", 0.0, team, model), 0
    if pid[0] == "d":
        day = int(datetime.strptime(pid[1:], "%Y%m%d").replace(tzinfo=UTC).timestamp()) // _DAY
        return BudgetScope(user_id, scope_key, "day", _periods(day).day[1], team, model), _periods(day).day[2]
    d = datetime.strptime(pid[1:], "%Y%m").replace(tzinfo=UTC)
    period = _periods(int(d.timestamp()) // _DAY).month
    return BudgetScope(user_id, scope_key, "month", period[1], team, model), period[2]


class Planner:
    """Principal -> Plan, cached by identity (resolvers hand out the same object)."""

    def __init__(self, prefix: str, lease_ms: int = 0) -> None:
        self.prefix = f"{prefix}:{scripts.VERSION}"
        self.lease_ms = lease_ms
        self._cache: dict[int, tuple[Principal, int, Plan | None]] = {}
        self._by_model: dict[tuple[int, str], tuple[Principal, int, Plan | None]] = {}
        self._periods: tuple[int, _PeriodKeys] | None = None

    def plan(self, principal: Principal, now: float | None = None, model: str | None = None) -> Plan | None:
        day = int((time.time() if now is None else now) // _DAY)
        if principal.team_model_budgets and model is not None:
            return self._model_plan(principal, day, model)
        hit = self._cache.get(id(principal))
        if hit is not None and hit[0] is principal and hit[1] == day:
            return hit[2]
        plan = self._build(principal, day)
        if len(self._cache) >= PLAN_CACHE_MAX:
            self._cache.clear()
        self._cache[id(principal)] = (principal, day, plan)
        return plan

    def _model_plan(self, principal: Principal, day: int, model: str) -> Plan | None:
        """A team with per-model budgets: plans differ by the request's model (cached per model)."""
        ck = (id(principal), model)
        hit = self._by_model.get(ck)
        if hit is not None and hit[0] is principal and hit[1] == day:
            return hit[2]
        plan = self._build(principal, day, model)
        if len(self._by_model) >= PLAN_CACHE_MAX:
            self._by_model.clear()
        self._by_model[ck] = (principal, day, plan)
        return plan

    def _period(self, day: int) -> _PeriodKeys:
        if self._periods is None or self._periods[0] != day:
            self._periods = (day, _periods(day))
        return self._periods[1]

    def _build(self, p: Principal, day: int, model: str | None = None) -> Plan | None:
        # Redis Cluster: every counter of one request shares one hash slot.  A team
        # member's counters (key, user and team) all carry the team's tag; a user
        # outside a team keeps the user's tag.  Joining or leaving a team therefore
        # moves a user's counters: rolling windows start afresh, budget counters are
        # rebuilt from the ledger on first use (README, "Teams").
        if p.team_id is not None:
            base = f"{self.prefix}:{{t:{_tag(p.team_id)}}}"
            scopes: tuple[tuple[Literal["key", "user", "team"], str, Limits], ...] = (
                ("key", f"k:{_tag(p.key_id)}", p.key_limits),
                ("user", f"u:{_tag(p.user_id)}", p.user_limits),
                ("team", "t", p.team_limits),
            )
        else:
            base = f"{self.prefix}:{{u:{_tag(p.user_id)}}}"
            scopes = (
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
            pico = usd_to_pico_floor(limits.budget_usd)
            checks.append(Check("b", scope, pico, f"{base}:b:{sid}:{pid}", period, since, ttl))
        if p.team_id is not None and model is not None:
            for glob, amount, per in p.team_model_budgets:
                if not model_matches(glob, model):
                    continue
                if per == "total":
                    pid, since, ttl = "all", 0.0, 0
                else:
                    pid, since, ttl = getattr(self._period(day), per)
                checks.append(Check("b", "team", usd_to_pico_floor(amount), f"{base}:b:tm:{glob.encode().hex()}:{pid}",
                                    cast(Period, per), since, ttl, glob))
        caps = [lim.max_tokens for _, _, lim in scopes if lim.max_tokens is not None]
        if not checks:
            return None
        args: list[str | int] = []
        for c in checks:
            args += (c.kind, c.limit)
        keys = tuple(c.key for c in checks)
        settle_keys = tuple(c.key for c in checks if c.kind != "r")
        rate_i = tuple(i for i, c in enumerate(checks) if c.kind == "r")
        token_i = tuple(i for i, c in enumerate(checks) if c.kind == "t")
        budget = [c for c in checks if c.kind == "b"]
        return Plan(
            user_id=p.user_id,
            key_id=p.key_id,
            checks=tuple(checks),
            keys=keys,
            args=tuple(args),
            limits=tuple(c.limit for c in checks),
            rate_i=rate_i,
            token_i=token_i,
            budget_i=tuple(i for i, c in enumerate(checks) if c.kind == "b"),
            settle=tuple(i for i, c in enumerate(checks) if c.kind != "r"),
            settle_keys=settle_keys,
            lease_keys=tuple(c.key for c in checks if c.kind == "c"),
            renew_keys=tuple(c.key for c in checks if c.kind in ("c", "b")),
            renew_kinds=tuple(c.kind for c in checks if c.kind in ("c", "b")),
            budget_keys=tuple(c.key for c in checks if c.kind == "b"),
            output_cap=min(caps) if caps else 0,
            team_id=p.team_id,
            token_cap=min((checks[i].limit for i in token_i), default=0),
            admit_head=encode_parts("EVALSHA", scripts.ADMIT.sha, len(keys), *keys),
            admit_tail=encode_parts(self.lease_ms, *args),
            admit_argc=7 + len(keys) + len(args),
            admit_start=b"*%d\r\n" % (7 + len(keys) + len(args)) + encode_parts("EVALSHA", scripts.ADMIT.sha, len(keys), *keys),
            settle_bulk=encode_parts(*settle_keys),
            settle_kinds="".join(c.kind for c in checks if c.kind != "r"),
            settle_n=len(settle_keys),
            settle_one=b"*%d\r\n" % (5 + len(settle_keys)) + scripts.SETTLE_MANY.head
            + encode_parts(len(settle_keys), *settle_keys),
            budget_targets=tuple(
                (c.key, (scope, c.ttl_s))
                for c, scope in zip(budget, budget_scopes(p.user_id, p.key_id, p.team_id, budget), strict=True)
            ),
            rate_best=rate_i[0] if len(rate_i) == 1 else -1,
            token_best=token_i[0] if len(token_i) == 1 else -1,
            demands=bool(token_i or budget),
            simple_headers=len(rate_i) <= 1 and len(token_i) <= 1,
            rate_at=4 + 2 * rate_i[0] if len(rate_i) == 1 else 0,
            rate_limit=checks[rate_i[0]].limit if len(rate_i) == 1 else 0,
            rate_limit_s=f"{checks[rate_i[0]].limit}" if len(rate_i) == 1 else "",
            token_at=4 + 2 * token_i[0] if len(token_i) == 1 else 0,
            token_limit=checks[token_i[0]].limit if len(token_i) == 1 else 0,
            token_limit_s=f"{checks[token_i[0]].limit}" if len(token_i) == 1 else "",
            budget_at=tuple((4 + 2 * i, c.key) for i, c in enumerate(checks) if c.kind == "b"),
        )


def budget_scopes(user_id: str, key_id: str, team_id: str | None, checks: Sequence[Check]) -> list[BudgetScope]:
    """The ledger scopes (user, key or whole user, period) of budget checks."""
    return [BudgetScope(user_id, key_id if c.scope == "key" else None, c.period, c.since,
                        team_id if c.scope == "team" else None, c.model) for c in checks]


# --------------------------------------------------------------------------- shared pieces


@dataclass(slots=True)
class Held:
    """What an admitted request holds until it settles (``Reservation.state``)."""

    plan: Plan
    member: str
    sec: int
    tokens: int
    cost: int
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
    parked: int = 0  # settlements and applications kept for when Redis answers again
    applied: int = 0  # committed usage records whose cost went into budget counters
    unapplied: int = 0  # ... that could not (Redis down): their counters are rebased instead
    rebases: int = 0  # budget counters reset to the ledger's figure (after an outage, or reconciled)


def demand(plan: Plan, facts: RequestFacts, prices: PriceTable, token_cap: int) -> tuple[int, int]:
    """(tokens, pico-dollars) to reserve: estimated input + every choice's output cap, worst-case priced."""
    if not plan.token_i and not plan.budget_i:
        return 0, 0
    # Worst case: every choice (OpenAI ``n``) produces its whole per-choice ask.
    output = facts.choices * (facts.max_tokens or plan.output_cap or DEFAULT_OUTPUT_RESERVE)
    est_in = facts.body_len // 4 + 1  # RequestFacts.est_input_tokens, written out (a call fewer per request)
    tokens = min(est_in + output, token_cap) if plan.token_i else 0
    cost = 0
    if plan.budget_i:
        price = prices.lookup(facts.model) or prices.default
        if price is not None:  # Price.worst_case_pico, written out
            cost = est_in * (price.input if price.input >= price.cache_write else price.cache_write) + output * price.output
    return tokens, cost


# A reset under a minute (the usual one: windows are a minute long) is two lookups: whole seconds, then the
# fraction with its unit (".125s", ".5s", "s"); no number is formatted per answer.
SECONDS = tuple(f"{s}" for s in range(60))
FRACTION = tuple(("." + f"{ms:03d}".rstrip("0") if ms else "") + "s" for ms in range(1000))


def duration(ms: int) -> str:
    """OpenAI's reset format: ``250ms``, ``1.5s``, ``1m0s`` (seconds: at most three decimals, no trailing zeros)."""
    if 1000 <= ms < 60_000 and ms.__class__ is int:
        return SECONDS[ms // 1000] + FRACTION[ms % 1000]
    if ms < 1000:
        return f"{ms if ms > 0 else 0}ms"
    if ms.__class__ is not int:  # never from the limiters; formatted the general way
        minutes, rest = divmod(ms, 60_000) if ms >= 60_000 else (0, ms)
        return (f"{minutes}m" if minutes else "") + f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = ms // 60_000, ms % 60_000
    whole, frac = rest // 1000, rest % 1000
    if not frac:
        secs = f"{whole}"
    elif frac % 100 == 0:
        secs = f"{whole}.{frac // 100}"
    elif frac % 10 == 0:
        secs = f"{whole}.{frac // 10:02d}"
    else:
        secs = f"{whole}.{frac:03d}"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _trio(
    out: dict[str, str], what: str, idx: tuple[int, ...], limits: Sequence[int], used: Sequence[int],
    reset: Sequence[int],
) -> None:
    best = idx[0] if len(idx) == 1 else min(idx, key=lambda i: limits[i] - used[i])
    left = limits[best] - used[best]
    out[f"x-ratelimit-limit-{what}"] = f"{limits[best]}"
    out[f"x-ratelimit-remaining-{what}"] = f"{left if left > 0 else 0}"
    out[f"x-ratelimit-reset-{what}"] = duration(reset[best])


def rate_headers(plan: Plan, limits: Sequence[int], d: Decision) -> dict[str, str]:
    """``x-ratelimit-*`` for the tightest request and token limits of this request."""
    out: dict[str, str] = {}
    i = plan.rate_best
    if i >= 0:  # one request-rate check (the usual case): no choosing, no call but duration's
        left = limits[i] - d.used[i]
        out["x-ratelimit-limit-requests"] = f"{limits[i]}"
        out["x-ratelimit-remaining-requests"] = f"{left if left > 0 else 0}"
        out["x-ratelimit-reset-requests"] = duration(d.reset[i])
    elif plan.rate_i:
        _trio(out, "requests", plan.rate_i, limits, d.used, d.reset)
    i = plan.token_best
    if i >= 0:
        left = limits[i] - d.used[i]
        out["x-ratelimit-limit-tokens"] = f"{limits[i]}"
        out["x-ratelimit-remaining-tokens"] = f"{left if left > 0 else 0}"
        out["x-ratelimit-reset-tokens"] = duration(d.reset[i])
    elif plan.token_i:
        _trio(out, "tokens", plan.token_i, limits, d.used, d.reset)
    return out


_PERIOD_WORD = {"day": "daily", "month": "monthly", "total": "total"}


def decide(stats: LimiterStats, plan: Plan, limits: Sequence[int], d: Decision, cost: int) -> dict[str, str]:
    """Count a decision; return the rate-limit headers of an admission, raise the 429 of a rejection."""
    headers = rate_headers(plan, limits, d)
    if not d.status:
        err = rejection(plan, limits, d, cost, headers)
        if err.kind is ErrorKind.BUDGET_EXCEEDED:
            stats.budget_exceeded += 1
        else:
            stats.rate_limited += 1
        raise err
    stats.admitted += 1
    return headers


def rejection(plan: Plan, limits: Sequence[int], d: Decision, cost: int, headers: dict[str, str]) -> GatewayError:
    i = d.failed - 1
    check = plan.checks[i]
    who = {"key": "API key", "user": "user", "team": "team"}[check.scope]
    if check.kind == "b":
        left = max(0, limits[i] - d.used[i])
        which = f" for models matching {check.model!r}" if check.model is not None else ""
        return GatewayError(
            ErrorKind.BUDGET_EXCEEDED,
            f"Budget exhausted: this {who}'s {_PERIOD_WORD[check.period]} budget{which} of ${usd(check.limit)} has "
            f"${usd(left)} left and this request could cost up to ${usd(cost)}.",
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
