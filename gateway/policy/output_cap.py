"""How much output a request may produce, and the ``max_tokens`` cap on it.

Every way a request can ask for output counts (``effective_output``):

| path | per-choice ask | choices |
| --- | --- | --- |
| ``/v1/messages`` | ``max_tokens``, at least ``thinking.budget_tokens`` | 1 |
| ``/v1/chat/completions`` | the larger of ``max_tokens`` and ``max_completion_tokens`` | ``n`` |
| ``/v1/responses`` | ``max_output_tokens`` | 1 |
| anything else (embeddings, count_tokens) | no output | 1 |

A key's or user's ``max_tokens`` limit caps the request's total output ask,
``choices x per-choice``: above it the request is refused (400).  A request
that asks for no limit at all (field omitted or ``null``) gets the cap written
into the forwarded body (``inject``), so the provider enforces it; with
``n > 1`` it must name a per-choice maximum itself.  Without a cap nothing is
rewritten and passthrough stays byte-exact.  Budgets reserve the worst case,
``choices x (per-choice ask or the cap or a default)`` (``policy/plans.demand``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

# Per path: (fields whose largest value is the per-choice ask, the field a cap is written to, reads n).
_PATHS: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "/v1/messages": (("max_tokens",), "max_tokens", False),
    "/v1/chat/completions": (("max_tokens", "max_completion_tokens"), "max_completion_tokens", True),
    "/v1/responses": (("max_output_tokens",), "max_output_tokens", False),
}
MAX_CHOICES = 128  # OpenAI's own limit on n


class BadOutputAsk(ValueError):
    """A field of the output ask is malformed (the message names it)."""


class OutputAsk(NamedTuple):  # a tuple: built on every request, cheaply
    per_choice: int | None  # the largest per-choice output asked for; None: no limit asked
    choices: int = 1
    cap_field: str = ""  # where a cap is written when none was asked; "" for paths without output


NO_OUTPUT = OutputAsk(None)


def _positive(doc: dict[str, Any], name: str, label: str | None = None) -> int | None:
    v = doc.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BadOutputAsk(f"{label or name}: must be a positive integer.")
    return v


def effective_output(doc: dict[str, Any], path: str) -> OutputAsk:
    """The output a request asks for, read from its JSON body; raises BadOutputAsk."""
    spec = _PATHS.get(path)
    if spec is None:
        return NO_OUTPUT
    fields, cap_field, has_n = spec
    ask: int | None = None
    for name in fields:
        v = doc.get(name)
        if v is None:
            continue
        if v.__class__ is not int or v < 1:  # bool is not int here: no builtin call per field
            raise BadOutputAsk(f"{name}: must be a positive integer.")
        if ask is None or v > ask:
            ask = v
    if path == "/v1/messages":
        thinking = doc.get("thinking")
        if isinstance(thinking, dict):
            budget = _positive(thinking, "budget_tokens", "thinking.budget_tokens")
            if budget is not None and (ask is None or budget > ask):
                ask = budget
    choices = 1
    if has_n and "n" in doc:
        choices = _positive(doc, "n") or 1
        if choices > MAX_CHOICES:
            raise BadOutputAsk(f"n: at most {MAX_CHOICES}.")
    return OutputAsk(ask, choices, cap_field)


def cap_problem(ask: OutputAsk, cap: int, who: str) -> str | None:
    """Why ``ask`` breaks an output cap of ``cap`` tokens, or None when it fits (after ``inject``)."""
    if not ask.cap_field:
        return None
    if ask.per_choice is None:
        if ask.choices > 1:
            return (f"max_tokens: this {who} may ask for at most {cap} output tokens in all; with n={ask.choices} "
                    f"set max_tokens (per choice) to at most {cap // ask.choices}.")
        return None  # the cap is injected
    total = ask.per_choice * ask.choices
    if total > cap:
        if ask.choices > 1:
            return (f"max_tokens: n={ask.choices} x {ask.per_choice} = {total} output tokens is above "
                    f"this {who}'s limit of {cap}.")
        return f"max_tokens: {ask.per_choice} is above this {who}'s limit of {cap}."
    return None


def inject(doc: dict[str, Any], ask: OutputAsk, cap: int | None) -> OutputAsk | None:
    """Write ``cap`` into a body that asked for no output limit; the new ask, or None when unchanged."""
    if cap is None or ask.per_choice is not None or not ask.cap_field:
        return None
    doc[ask.cap_field] = cap
    return OutputAsk(cap, ask.choices, ask.cap_field)
