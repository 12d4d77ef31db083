"""Is a failed ledger write an outage (retry later) or a refusal (set the record aside)?

The writer must never take one for the other: an outage retried as a refusal
would lose usage, and a refusal retried as an outage blocks the journal for
good (a 3 KB model name overflowing the rollup's index, a NUL in a text
column).  Postgres says which by its SQLSTATE class:

| class | meaning | verdict |
| --- | --- | --- |
| 08 | connection exception | outage |
| 25, 40 | transaction state, rollback (serialization failure, deadlock) | outage |
| 28, 3D | authorization, database missing (a deployment problem) | outage |
| 42 | schema object missing or wrong (migrations not applied) | outage |
| 53 | insufficient resources (disk full, out of memory, too many connections) | outage |
| 55 | object not in prerequisite state (lock not available) | outage |
| 57 | operator intervention (admin shutdown, cannot connect now, statement timeout) | outage |
| 58, XX, F0 | system, internal, configuration errors | outage |
| 22 | data exception (bad encoding, NUL, out of range, too long) | refused |
| 23 | integrity constraint violation (a CHECK) | refused |
| 44 | WITH CHECK OPTION violation | refused |
| 54 | program limit exceeded (index row too large) | refused |
| P0 | a PL/pgSQL RAISE (a trigger refusing the row) | refused |

Any other class is treated as an outage: usage is never dropped on a guess,
and the writer's readiness reports it with its SQLSTATE.  An outage that
Postgres itself answers and that is not transient (``persistent``: classes
28, 3D, 42, 58, F0, XX and unknown ones) may still be one record's doing (an
internal error on one value): when it repeats, the writer probes it
(``ledger.py``): if a harmless canary record (rolled back) goes in, the
records that still fail are set aside; if the canary fails too, it is the
database's fault and stays an outage.  Outside Postgres:
a record that cannot even be encoded (asyncpg's client-side ``DataError``, a
timestamp out of range) is refused; OSError, ConnectionError, timeouts and a
lost connection are outages.
"""

from __future__ import annotations

import enum

import asyncpg


class Verdict(enum.Enum):
    OUTAGE = "outage"
    REFUSED = "refused"


REFUSED_CLASSES = frozenset({"22", "23", "44", "54", "P0"})
# Outages that pass by themselves (connection, transaction state, rollback, resources, locks, operator).
TRANSIENT_CLASSES = frozenset({"08", "25", "40", "53", "55", "57"})
OUTAGE_CLASSES = frozenset({"08", "25", "28", "3D", "40", "42", "53", "55", "57", "58", "F0", "XX"})

# Raised while encoding a batch in Python: the data itself cannot be sent.
ENCODING_ERRORS: tuple[type[BaseException], ...] = (ValueError, OverflowError, TypeError)


class RecordRefused(Exception):
    """A batch holds a record that cannot be encoded for Postgres (see ``ENCODING_ERRORS``)."""


def sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def classify(exc: BaseException) -> Verdict:
    """Outage or refusal, for any exception a ledger batch write may raise."""
    if isinstance(exc, RecordRefused):
        return Verdict.REFUSED
    if isinstance(exc, asyncpg.PostgresError):
        state = sqlstate(exc)
        return Verdict.REFUSED if state[:2] in REFUSED_CLASSES else Verdict.OUTAGE
    # asyncpg's client-side DataError is an InterfaceError *and* a ValueError: bad input, not a lost link.
    if isinstance(exc, ValueError) and isinstance(exc, asyncpg.InterfaceError):
        return Verdict.REFUSED
    return Verdict.OUTAGE  # DatabaseUnavailable, OSError, ConnectionError, timeouts, lost connections, the unknown


def persistent(exc: BaseException) -> bool:
    """An outage that Postgres answered and that will not pass by itself (schema, internal, unknown)."""
    return isinstance(exc, asyncpg.PostgresError) and sqlstate(exc)[:2] not in TRANSIENT_CLASSES | REFUSED_CLASSES
