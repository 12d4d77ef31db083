"""A team's per-model budgets <-> the JSONB ``teams.model_budgets`` column.

``{"gpt-4o*": {"budget_usd": 100, "budget_period": "month"}}``: each entry a
model name or glob (``*`` and ``?`` only) with a budget and its period.
"""

from __future__ import annotations

from typing import Any

ModelBudgets = tuple[tuple[str, float, str], ...]


def model_budgets_from_json(doc: dict[str, Any] | None) -> ModelBudgets:
    if not doc:
        return ()
    out = []
    for glob, b in sorted(doc.items()):
        if isinstance(b, dict) and b.get("budget_usd") is not None:
            out.append((glob, float(b["budget_usd"]), str(b.get("budget_period") or "total")))
    return tuple(out)


def model_budgets_to_json(budgets: ModelBudgets) -> dict[str, Any]:
    return {glob: {"budget_usd": usd, "budget_period": period} for glob, usd, period in budgets}
