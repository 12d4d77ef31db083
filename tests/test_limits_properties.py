"""Property tests for the limiter's arithmetic (policy/windows.py, the Redis script's twin).

Random interleavings of admissions, settlements and clock steps; after each
step the invariants must hold: no rolling minute ever holds more admitted
requests than the limit, token windows hold no more than the limit plus what
settlement added beyond reservations, leases never exceed the limit, spend is
never negative and never above the budget except by (actual - reserved) of
settled requests, and a rejection reserves nothing.
"""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.limits import duration
from gateway.policy.windows import WINDOW_MS, LocalCounters

RPM, TPM, CONC, BUDGET = "rk", "tk", "ck", "bk"

steps = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(1, 400), st.integers(0, 900)),
        st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 900)),
        st.tuples(st.just("tick"), st.integers(0, 20_000), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(
    rpm=st.integers(1, 8),
    tpm=st.integers(1, 2_000),
    conc=st.integers(1, 4),
    budget=st.integers(0, 5_000),
    script=steps,
)
def test_limits_hold_under_any_interleaving(rpm: int, tpm: int, conc: int, budget: int, script: list[tuple[str, int, int]]) -> None:
    """Requests, tokens, leases and spend stay within their limits; settlement never goes negative."""
    c = LocalCounters()
    checks = [("r", RPM, rpm), ("t", TPM, tpm), ("c", CONC, conc), ("b", BUDGET, budget)]
    now = 1_000_000
    admitted_at: list[int] = []
    held: list[tuple[str, int, int, int]] = []  # member, sec, tokens, cost
    overrun = 0  # sum of (actual - reserved) cost over settled requests, where positive
    token_overrun = 0
    n = 0
    for op, a, b in script:
        if op == "tick":
            now += a
        elif op == "admit":
            n += 1
            member, tokens, cost = f"m{n}", min(a, tpm), b
            before = (len(c.requests.get(RPM, ())), dict(c.spend), {k: set(v) for k, v in c.leases.items()})
            d = c.admit(checks, now, member, tokens, cost)
            if d.status:
                admitted_at.append(now)
                held.append((member, d.sec, tokens, cost))
                assert d.failed == 0
            else:
                # all or nothing: a rejection reserves nothing
                assert before[1] == c.spend
                assert before[2] == {k: set(v) for k, v in c.leases.items()}
                assert 1 <= d.failed <= len(checks)
                assert d.retry_ms >= 0
        elif held:
            member, sec, tokens, cost = held.pop(a % len(held))
            actual_tokens, actual_cost = min(b, tpm), b
            c.settle([("t", TPM), ("c", CONC), ("b", BUDGET)], member, sec, actual_tokens - tokens, cost, actual_cost)
            overrun += max(0, actual_cost - cost)
            token_overrun += max(0, actual_tokens - tokens)
        # invariants
        window = [t for t in admitted_at if now - WINDOW_MS < t <= now]
        assert len(window) <= rpm
        assert len(c.leases.get(CONC, ())) <= conc
        assert len(c.leases.get(CONC, ())) == len(held)
        assert c.spend.get(BUDGET, 0) >= 0
        assert c.spend.get(BUDGET, 0) <= budget + overrun
        assert all(bucket[1] >= 0 for bucket in c.tokens.get(TPM, ()))
        live = sum(v for s, v in c.tokens.get(TPM, ()) if s > now // 1000 - 60)
        assert live <= tpm + token_overrun


def clone(c: LocalCounters) -> LocalCounters:
    n = LocalCounters()
    n.requests = {k: deque(v) for k, v in c.requests.items()}
    n.tokens = {k: deque([list(b) for b in v]) for k, v in c.tokens.items()}
    n.leases = {k: set(v) for k, v in c.leases.items()}
    n.spend = dict(c.spend)
    return n


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 20), gaps=st.lists(st.integers(0, 5_000), min_size=1, max_size=80))
def test_rpm_retry_after_is_exact(limit: int, gaps: list[int]) -> None:
    """A rejected request fits exactly at now + retry_ms, and not 1 ms earlier."""
    c = LocalCounters()
    now = 10_000_000
    for i, gap in enumerate(gaps):
        now += gap
        d = c.admit([("r", "k", limit)], now, f"m{i}", 0, 0)
        if d.status:
            continue
        assert d.retry_ms >= 1
        assert 0 == clone(c).admit([("r", "k", limit)], now + d.retry_ms - 1, "x", 0, 0).status
        assert 1 == clone(c).admit([("r", "k", limit)], now + d.retry_ms, "y", 0, 0).status


@settings(max_examples=200, deadline=None)
@given(tpm=st.integers(1, 1_000), sizes=st.lists(st.tuples(st.integers(0, 3_000), st.integers(1, 1_000)), max_size=60))
def test_tpm_retry_after_admits_exactly_then(tpm: int, sizes: list[tuple[int, int]]) -> None:
    """For tokens too, retry_ms is the first moment the request fits."""
    c = LocalCounters()
    now = 5_000_000
    for i, (gap, size) in enumerate(sizes):
        now += gap
        tokens = min(size, tpm)
        d = c.admit([("t", "k", tpm)], now, f"m{i}", tokens, 0)
        if d.status:
            continue
        assert 0 == clone(c).admit([("t", "k", tpm)], now + d.retry_ms - 1, "x", tokens, 0).status
        assert 1 == clone(c).admit([("t", "k", tpm)], now + d.retry_ms, "y", tokens, 0).status


@given(ms=st.integers(0, 10 * 60_000))
def test_reset_duration_format_round_trips(ms: int) -> None:
    """x-ratelimit-reset-* reads back (OpenAI's format) to the same milliseconds."""
    text = duration(ms)
    if text.endswith("ms"):
        back = int(text[:-2])
    else:
        minutes = 0
        body = text[:-1]
        if "m" in body:
            m, body = body.split("m")
            minutes = int(m)
        back = minutes * 60_000 + round(float(body) * 1000)
    assert ms == back


@settings(max_examples=300, deadline=None)
@given(
    day=st.integers(0, 40_000),  # 1970 .. 2079
    period=st.sampled_from(["day", "month", "total"]),
    user_period=st.sampled_from(["day", "month", "total"]),
    user_id=st.text(min_size=1, max_size=30) | st.sampled_from(["u:b:u:x", "a}:b:u:", "{u:x}"]),
    key_id=st.text(min_size=1, max_size=30) | st.sampled_from(["x:b:u:y", "k:b:u:all", "}:b:u:"]),
)
def test_a_budget_counters_name_gives_back_its_ledger_scope(
    day: int, period: str, user_period: str, user_id: str, key_id: str
) -> None:
    """scope_of(key name) == the scope the planner built it from: what a rebase after an outage asks the ledger."""
    from gateway.config import Limits
    from gateway.policy.budget_rebuild import BudgetScope
    from gateway.policy.plans import Planner, scope_of
    from gateway.policy.principals import Principal

    p = Principal(
        key_id, key_id, key_id, user_id,
        key_limits=Limits(budget_usd=1.0, budget_period=period),  # type: ignore[arg-type]
        user_limits=Limits(budget_usd=2.0, budget_period=user_period),  # type: ignore[arg-type]
    )
    plan = Planner("gw").plan(p, now=day * 86_400.0 + 12_345)
    assert plan is not None
    for c in (plan.checks[i] for i in plan.budget_i):
        expected = BudgetScope(user_id, key_id if c.scope == "key" else None, c.period, c.since)
        assert (expected, c.ttl_s) == scope_of(c.key, user_id, key_id)
