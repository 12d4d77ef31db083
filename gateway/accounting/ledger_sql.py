"""The ledger's batch INSERT: usage rows in, exactly the new ones rolled up, in one statement.

Two shapes of the same statement:

- ``JSON_INSERT_SQL`` takes the batch as one JSON array, the journal lines the
  writer already encoded (``record()``): nothing is converted per record in
  Python.  Postgres reads each column with its own input function; ``ts``
  (unix seconds, a double) becomes a timestamp exactly as
  ``datetime.fromtimestamp(ts, UTC)`` rounds it (whole seconds, then the
  fraction to the nearest microsecond, ties to even), so a record replayed
  through the other shape deduplicates against it.  ``cost_micros`` is the
  exact ceiling of ``cost_pico`` / 10^6 in integer arithmetic.
- ``INSERT_SQL`` takes one typed array per column (``columns()``): for
  records read back from a journal file, whose lines may come from an older
  release or a hand-edited file (a value of the wrong type is refused here,
  never coerced).

Both insert with ``ON CONFLICT (request_id, ts) DO NOTHING`` and add exactly
the inserted rows to the daily and hourly rollups.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.accounting.ledger_errors import ENCODING_ERRORS, RecordRefused
from gateway.accounting.money import micros_ceil
from gateway.accounting.record import UsageRecord

_COLUMNS = (
    "request_id", "ts", "key_id", "user_id", "model", "route", "upstream", "status", "streamed", "partial",
    "input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens", "cost_micros", "priced",
    "upstream_ms", "ttft_ms", "gateway_ms", "error_kind",
    "served_model", "cost_pico",
)
_TYPES = (
    "text", "timestamptz", "text", "text", "text", "text", "text", "int4", "bool", "bool",
    "int8", "int8", "int8", "int8", "int8", "bool", "float4", "float4", "float4", "text",
    "text", "int8",
)
# Cost-attribution tags (migration 0021), last: _columns() ends with tag_column().
_COLUMNS = (*_COLUMNS, "tags")  # type: ignore[assignment]  # one more column
_TYPES = (*_TYPES, "jsonb")  # type: ignore[assignment]

# One statement: insert what is new, then roll up exactly those rows (daily and hourly).
# cost_pico (exact, numeric in the rollups) is the truth; cost_micros (each record rounded up to
# a micro-dollar) is kept for the previous release (migrations 0011, 0012).
_SUMS = ("requests", "partial_requests", "unpriced_requests", "input_tokens", "output_tokens",
         "cache_write_tokens", "cache_read_tokens", "cost_micros", "cost_pico")
_AGG = """count(*), count(*) FILTER (WHERE partial), count(*) FILTER (WHERE NOT priced),
           sum(input_tokens), sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens),
           sum(cost_micros), sum(cost_pico)"""


def _rollup(name: str, table: str, bucket: str, unit: str, shard: str) -> str:
    sets = ",\n        ".join(f"{c} = r.{c} + excluded.{c}" for c in _SUMS)
    return f"""{name} AS (
    INSERT INTO {table} AS r ({unit}, user_id, key_id, model, shard, {", ".join(_SUMS)})
    SELECT {bucket}, user_id, key_id, model, {shard}, {_AGG}
    FROM ins
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT ({unit}, user_id, key_id, model, shard) DO UPDATE SET
        {sets}
    RETURNING 1
)"""  # noqa: S608 - composed from constants only


def _insert_sql(rows: str, shard: str) -> str:
    """The statement for ``rows`` (a SELECT of _COLUMNS), ``shard`` the rollup shard's parameter."""
    return f"""
WITH ins AS (
    INSERT INTO usage_ledger ({", ".join(_COLUMNS)})
    {rows}
    ON CONFLICT (request_id, ts) DO NOTHING
    RETURNING request_id, ts, user_id, key_id, model, partial, priced,
              input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, cost_pico
), {_rollup("daily", "usage_daily", "(ts AT TIME ZONE 'UTC')::date", "day", shard)},
{_rollup("hourly", "usage_hourly", "date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'", "hour", shard)}
SELECT (SELECT array_agg(request_id) FROM ins) AS ids, pg_current_xact_id()::text AS xid
"""  # noqa: S608 - composed from constants only


INSERT_SQL = _insert_sql(
    f"SELECT * FROM unnest({', '.join(f'${i + 1}::{t}[]' for i, t in enumerate(_TYPES))})",  # noqa: S608
    f"${len(_TYPES) + 1}::int2",
)

# The same statement over the journal lines of a batch (a JSON array of ledger.encode(record)).
# Floats arrive as float8 (the double the gateway had) and are cast like asyncpg's float4 encoder.
_JSON_FIELDS = (
    "request_id text, ts float8, key_id text, user_id text, model text, route text, upstream text, status int4, "
    "streamed bool, partial bool, input_tokens int8, output_tokens int8, cache_write_tokens int8, "
    "cache_read_tokens int8, cost_pico int8, priced bool, upstream_ms float8, ttft_ms float8, gateway_ms float8, "
    "error_kind text, served_model text, tags jsonb"
)
_JSON_VALUES = {
    "ts": "to_timestamp(floor(x.ts)) + round((x.ts - floor(x.ts)) * 1000000::float8) * interval '1 microsecond'",
    "cost_micros": "x.cost_pico / 1000000 + (x.cost_pico % 1000000 > 0)::int",
    "upstream_ms": "x.upstream_ms::float4",
    "ttft_ms": "x.ttft_ms::float4",
    "gateway_ms": "x.gateway_ms::float4",
}
JSON_INSERT_SQL = _insert_sql(
    f"SELECT {', '.join(_JSON_VALUES.get(c, f'x.{c}') for c in _COLUMNS)}\n"  # noqa: S608 - constants only
    f"    FROM jsonb_to_recordset($1::text::jsonb) AS x({_JSON_FIELDS})",
    "$2::int2",
)


def columns(batch: list[UsageRecord]) -> list[list[Any]]:
    """Column arrays for INSERT_SQL's unnest (RecordRefused when a record cannot be encoded)."""
    try:
        return _columns(batch)
    except ENCODING_ERRORS as exc:
        raise RecordRefused(f"{type(exc).__name__}: {exc}") from None


def _columns(batch: list[UsageRecord]) -> list[list[Any]]:
    return [
        [r.request_id for r in batch],
        [datetime.fromtimestamp(r.ts, UTC) for r in batch],
        [r.key_id for r in batch],
        [r.user_id for r in batch],
        [r.model for r in batch],
        [r.route for r in batch],
        [r.upstream for r in batch],
        [r.status for r in batch],
        [r.streamed for r in batch],
        [r.partial for r in batch],
        [r.input_tokens for r in batch],
        [r.output_tokens for r in batch],
        [r.cache_write_tokens for r in batch],
        [r.cache_read_tokens for r in batch],
        [micros_ceil(r.cost_pico) for r in batch],
        [r.priced for r in batch],
        [r.upstream_ms for r in batch],
        [r.ttft_ms for r in batch],
        [r.gateway_ms for r in batch],
        [r.error_kind for r in batch],
        [r.served_model for r in batch],
        [r.cost_pico for r in batch],
        tag_column(batch),
    ]


def tag_column(batch: list[UsageRecord]) -> list[Any]:
    """The tags array for INSERT_SQL (after the columns() arrays)."""
    return [r.tags for r in batch]
