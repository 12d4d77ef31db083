"""rebuild_budgets: what each budget scope spent since its period began, read from the ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway import keys
from gateway.policy.budget_rebuild import BudgetScope, rebuild_budgets
from tests.test_accounting_reports import DAY0, synthetic


async def test_rebuild_sums_cost_per_user_and_key_scope_since_the_period_start(cp):
    """Day-aligned, month-aligned, mid-day and total periods; user scopes sum over all their keys."""
    app = cp.server.app
    recs = synthetic(500, seed=3)
    for r in recs:
        app[keys.USAGE].record(r)
    await app[keys.USAGE].flush()
    starts = {
        "day": DAY0 + timedelta(days=3),
        "month": datetime(2026, 11, 1, tzinfo=UTC),
        "total": datetime.fromtimestamp(0, UTC),
    }
    scopes = [
        BudgetScope(user, key, period, starts[period].timestamp() if period != "total" else 0.0)
        for user in ("u1", "u2", "nobody")
        for key in (None, "k1", "k3")
        for period in ("day", "month", "total")
    ]
    odd = BudgetScope("u1", None, "day", (DAY0 + timedelta(days=1, hours=7)).timestamp())  # not at midnight
    scopes.append(odd)
    answer = await rebuild_budgets(app, scopes)
    assert answer is not None
    got = answer.spent
    xmin, xmax, _ = answer.snapshot.split(":")  # the snapshot the sums were read in
    assert 0 < int(xmin) <= int(xmax)
    for sc in scopes:
        expected = sum(
            r.cost_pico for r in recs
            if r.user_id == sc.user_id and (sc.key_id is None or r.key_id == sc.key_id) and r.ts >= sc.since
        )
        assert expected == got[sc], sc


async def test_rebuild_answers_none_without_a_database(gateway):
    """Standalone: no ledger to ask, so the limiter keeps its own figures."""
    assert None is await rebuild_budgets(gateway.server.app, [BudgetScope("u", None, "total", 0.0)])
