-- The usage ledger: one row per finished request, append-only.
--
-- Range-partitioned by month on ts (the writer creates the partitions it needs
-- through usage_ledger_ensure_partition before each batch; this migration
-- creates the current and the next month).  A unique index on a partitioned
-- table must contain the partition key, so dedup is on (request_id, ts): a
-- record replayed from a journal carries the same request id and the same ts,
-- and the gateway never records one request id twice with different times.
--
-- key_id and user_id are text: database keys are uuids, but a gateway in
-- database mode may also serve keys from its config file (named keys).
CREATE TABLE usage_ledger (
    request_id          text        NOT NULL,
    ts                  timestamptz NOT NULL,
    key_id              text        NOT NULL,
    user_id             text        NOT NULL,
    model               text        NOT NULL,
    route               text        NOT NULL DEFAULT '',
    upstream            text        NOT NULL DEFAULT '',
    status              integer     NOT NULL,
    streamed            boolean     NOT NULL,
    partial             boolean     NOT NULL,
    input_tokens        bigint      NOT NULL CHECK (input_tokens >= 0),
    output_tokens       bigint      NOT NULL CHECK (output_tokens >= 0),
    cache_write_tokens  bigint      NOT NULL CHECK (cache_write_tokens >= 0),
    cache_read_tokens   bigint      NOT NULL CHECK (cache_read_tokens >= 0),
    cost_micros         bigint      NOT NULL CHECK (cost_micros >= 0),
    priced              boolean     NOT NULL,
    upstream_ms         real        NOT NULL,
    ttft_ms             real,
    gateway_ms          real        NOT NULL,
    error_kind          text
) PARTITION BY RANGE (ts);

CREATE UNIQUE INDEX usage_ledger_request ON usage_ledger (request_id, ts);
CREATE INDEX usage_ledger_ts ON usage_ledger (ts);
CREATE INDEX usage_ledger_user_ts ON usage_ledger (user_id, ts);
CREATE INDEX usage_ledger_key_ts ON usage_ledger (key_id, ts);

-- Create the month partition holding ``at`` unless it exists (concurrent
-- writers serialise on a transaction-scoped advisory lock).
CREATE FUNCTION usage_ledger_ensure_partition(at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    lo   timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi   timestamptz := (date_trunc('month', at AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    name text := 'usage_ledger_' || to_char(at AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('usage_ledger_ensure_partition'));
    IF to_regclass(name) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF usage_ledger FOR VALUES FROM (%L) TO (%L)', name, lo, hi);
    END IF;
END
$$;

SELECT usage_ledger_ensure_partition(now());
SELECT usage_ledger_ensure_partition(now() + interval '1 month');

-- Daily rollup, maintained in the same transaction as the ledger rows from
-- exactly the rows a batch inserted (duplicates add nothing).  ``shard``
-- spreads concurrent writers over different rows: no hot-row UPDATE
-- contention between workers; readers sum over shards.
CREATE TABLE usage_daily (
    day                 date    NOT NULL,
    user_id             text    NOT NULL,
    key_id              text    NOT NULL,
    model               text    NOT NULL,
    shard               smallint NOT NULL,
    requests            bigint  NOT NULL,
    partial_requests    bigint  NOT NULL,
    unpriced_requests   bigint  NOT NULL,
    input_tokens        bigint  NOT NULL,
    output_tokens       bigint  NOT NULL,
    cache_write_tokens  bigint  NOT NULL,
    cache_read_tokens   bigint  NOT NULL,
    cost_micros         bigint  NOT NULL,
    PRIMARY KEY (day, user_id, key_id, model, shard)
);

CREATE INDEX usage_daily_user ON usage_daily (user_id, day);
CREATE INDEX usage_daily_key ON usage_daily (key_id, day);

-- Hourly rollup, same rules: a report's partial edge days are summed from
-- whole hours here, leaving at most two sub-hour slices for the ledger.
CREATE TABLE usage_hourly (
    hour                timestamptz NOT NULL,
    user_id             text    NOT NULL,
    key_id              text    NOT NULL,
    model               text    NOT NULL,
    shard               smallint NOT NULL,
    requests            bigint  NOT NULL,
    partial_requests    bigint  NOT NULL,
    unpriced_requests   bigint  NOT NULL,
    input_tokens        bigint  NOT NULL,
    output_tokens       bigint  NOT NULL,
    cache_write_tokens  bigint  NOT NULL,
    cache_read_tokens   bigint  NOT NULL,
    cost_micros         bigint  NOT NULL,
    PRIMARY KEY (hour, user_id, key_id, model, shard)
);
