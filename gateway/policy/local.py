"""Per-process limits: the standalone mode's limiter and the fallback while Redis is unreachable.

``LocalLimiter`` runs the same arithmetic as the Redis ADMIT script
(``policy/windows.py``) in process memory; each process takes its share
(1 / (workers x instances)) of every limit, so that all of them together
stay within the configured one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from gateway.accounting.pricing import PriceTable
from gateway.policy.admit import RequestFacts, Reservation
from gateway.policy.plans import PLAN_CACHE_MAX, Held, LimiterStats, Plan, Planner, decide, demand
from gateway.policy.principals import Principal
from gateway.policy.windows import LocalCounters


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
        plan = self.planner.plan(principal, model=facts.model)
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
        headers = decide(self.stats, plan, limits, d, cost)
        state = Held(plan, facts.request_id, d.sec, tokens, cost, local=True) if plan.settle else None
        return Reservation(headers=headers, state=state)

    def release(self, held: Held, tokens: int, cost: int) -> None:
        checks = [(held.plan.checks[i].kind, held.plan.checks[i].key) for i in held.plan.settle]
        self.counters.settle(checks, held.member, held.sec, tokens - held.tokens, held.cost, cost)
        self.stats.settles += 1

    async def settle(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation, tokens: int, cost_pico: int
    ) -> None:
        if isinstance(reservation.state, Held):
            self.release(reservation.state, tokens, cost_pico)

    def settle_later(
        self, principal: Principal, facts: RequestFacts, reservation: Reservation, tokens: int, cost_pico: int
    ) -> None:
        if isinstance(reservation.state, Held):  # in memory: nothing to wait for
            self.release(reservation.state, tokens, cost_pico)

    async def close(self) -> None:
        return None
