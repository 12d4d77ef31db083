"""What a ``model`` name in a request may look like, checked at the door.

A model name ends up in the usage ledger, its rollups' primary keys, metric
labels, log lines and the upstream request: an unbounded or binary name (a
3 KB random string, a NUL) would be refused by Postgres long after the request
was served.  Real provider names fit a small alphabet::

    claude-sonnet-4-5   anthropic.claude-sonnet-4-5-v1:0   gpt-4o-2024-08-06
    accounts/fireworks/models/x   meta-llama/Llama-3-8B@v1   ft:gpt-4o:org:name:id

so the gateway accepts 1..``MAX_MODEL_LEN`` characters of ASCII letters,
digits and ``. _ - : / @ +`` and answers anything else with a 400 in the
path's dialect.
"""

from __future__ import annotations

import re

MAX_MODEL_LEN = 256
_MODEL = re.compile(r"[A-Za-z0-9._:/@+-]{1,%d}" % MAX_MODEL_LEN)  # noqa: UP031 - a regex quantifier


def model_problem(model: object) -> str | None:
    """Why ``model`` is not an acceptable model name, or None when it is."""
    if not isinstance(model, str) or not model:
        return "model: a model name is required."
    if len(model) > MAX_MODEL_LEN:
        return f"model: at most {MAX_MODEL_LEN} characters."
    if _MODEL.fullmatch(model) is None:
        return "model: only letters, digits and . _ - : / @ + are allowed."
    return None
