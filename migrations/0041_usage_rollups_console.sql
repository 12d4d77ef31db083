-- Two smaller rollups for the console's usage reports over 100,000 keys and
-- tens of millions of ledger rows (gateway/accounting/reports.py picks the
-- smallest one that answers a query):
--   usage_daily_totals  (day, model)           no key or user filter or grouping: the chart, "by model"
--   usage_daily_users   (day, user_id, model)  "by user", one user's usage
--   usage_monthly_keys  (month, user_id, key)  whole months "by key" or "by user" (no model, no day)
-- Both are kept from usage_daily itself by statement-level triggers (transition
-- tables: one grouped upsert per statement), so every writer of usage_daily,
-- an older gateway during a rolling upgrade included, keeps them exact; the
-- shard of the source row is kept, so concurrent writers never share a row.
CREATE TABLE usage_daily_totals (
    day                date     NOT NULL,
    model              text     NOT NULL,
    shard              smallint NOT NULL,
    requests           bigint   NOT NULL,
    partial_requests   bigint   NOT NULL,
    unpriced_requests  bigint   NOT NULL,
    input_tokens       bigint   NOT NULL,
    output_tokens      bigint   NOT NULL,
    cache_write_tokens bigint   NOT NULL,
    cache_read_tokens  bigint   NOT NULL,
    cost_micros        bigint   NOT NULL,
    cost_pico          numeric  NOT NULL,  -- exact (migrations 0011-0012)
    PRIMARY KEY (day, model, shard)
);

CREATE TABLE usage_daily_users (
    day                date     NOT NULL,
    user_id            text     NOT NULL,
    model              text     NOT NULL,
    shard              smallint NOT NULL,
    requests           bigint   NOT NULL,
    partial_requests   bigint   NOT NULL,
    unpriced_requests  bigint   NOT NULL,
    input_tokens       bigint   NOT NULL,
    output_tokens      bigint   NOT NULL,
    cache_write_tokens bigint   NOT NULL,
    cache_read_tokens  bigint   NOT NULL,
    cost_micros        bigint   NOT NULL,
    cost_pico          numeric  NOT NULL,  -- exact (migrations 0011-0012)
    PRIMARY KEY (day, user_id, model, shard)
);

CREATE INDEX usage_daily_users_user ON usage_daily_users (user_id, day);

CREATE TABLE usage_monthly_keys (
    month              date     NOT NULL,   -- the first day of a UTC month
    user_id            text     NOT NULL,
    key_id             text     NOT NULL,
    shard              smallint NOT NULL,
    requests           bigint   NOT NULL,
    partial_requests   bigint   NOT NULL,
    unpriced_requests  bigint   NOT NULL,
    input_tokens       bigint   NOT NULL,
    output_tokens      bigint   NOT NULL,
    cache_write_tokens bigint   NOT NULL,
    cache_read_tokens  bigint   NOT NULL,
    cost_micros        bigint   NOT NULL,
    cost_pico          numeric  NOT NULL,  -- exact (migrations 0011-0012)
    PRIMARY KEY (month, user_id, key_id, shard)
);

CREATE INDEX usage_monthly_keys_key ON usage_monthly_keys (key_id, month);

CREATE FUNCTION usage_daily_fanout_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_daily_totals AS r (day, model, shard, requests, partial_requests, unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, cost_pico)
        SELECT n.day, n.model, n.shard, sum(requests), sum(partial_requests), sum(unpriced_requests), sum(input_tokens), sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_micros), sum(cost_pico)
        FROM new_rows n
        GROUP BY n.day, n.model, n.shard ORDER BY n.day, n.model, n.shard
        ON CONFLICT (day, model, shard) DO UPDATE SET
            requests = r.requests + excluded.requests,
            partial_requests = r.partial_requests + excluded.partial_requests,
            unpriced_requests = r.unpriced_requests + excluded.unpriced_requests,
            input_tokens = r.input_tokens + excluded.input_tokens,
            output_tokens = r.output_tokens + excluded.output_tokens,
            cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
            cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
            cost_micros = r.cost_micros + excluded.cost_micros,
            cost_pico = r.cost_pico + excluded.cost_pico;
    INSERT INTO usage_daily_users AS r (day, user_id, model, shard, requests, partial_requests, unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, cost_pico)
        SELECT n.day, n.user_id, n.model, n.shard, sum(requests), sum(partial_requests), sum(unpriced_requests), sum(input_tokens), sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_micros), sum(cost_pico)
        FROM new_rows n
        GROUP BY n.day, n.user_id, n.model, n.shard ORDER BY n.day, n.user_id, n.model, n.shard
        ON CONFLICT (day, user_id, model, shard) DO UPDATE SET
            requests = r.requests + excluded.requests,
            partial_requests = r.partial_requests + excluded.partial_requests,
            unpriced_requests = r.unpriced_requests + excluded.unpriced_requests,
            input_tokens = r.input_tokens + excluded.input_tokens,
            output_tokens = r.output_tokens + excluded.output_tokens,
            cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
            cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
            cost_micros = r.cost_micros + excluded.cost_micros,
            cost_pico = r.cost_pico + excluded.cost_pico;
    INSERT INTO usage_monthly_keys AS r (month, user_id, key_id, shard, requests, partial_requests, unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, cost_pico)
        SELECT date_trunc('month', n.day)::date, n.user_id, n.key_id, n.shard, sum(requests), sum(partial_requests), sum(unpriced_requests), sum(input_tokens), sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_micros), sum(cost_pico)
        FROM new_rows n
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (month, user_id, key_id, shard) DO UPDATE SET
            requests = r.requests + excluded.requests,
            partial_requests = r.partial_requests + excluded.partial_requests,
            unpriced_requests = r.unpriced_requests + excluded.unpriced_requests,
            input_tokens = r.input_tokens + excluded.input_tokens,
            output_tokens = r.output_tokens + excluded.output_tokens,
            cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
            cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
            cost_micros = r.cost_micros + excluded.cost_micros,
            cost_pico = r.cost_pico + excluded.cost_pico;
    RETURN NULL;
END $$;

CREATE FUNCTION usage_daily_fanout_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_daily_totals AS r (day, model, shard, requests, partial_requests, unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, cost_pico)
        SELECT n.day, n.model, n.shard, sum(n.requests - o.requests), sum(n.partial_requests - o.partial_requests), sum(n.unpriced_requests - o.unpriced_requests), sum(n.input_tokens - o.input_tokens), sum(n.output_tokens - o.output_tokens), sum(n.cache_write_tokens - o.cache_write_tokens), sum(n.cache_read_tokens - o.cache_read_tokens), sum(n.cost_micros - o.cost_micros), sum(n.cost_pico - o.cost_pico)
        FROM new_rows n JOIN old_rows o USING (day, user_id, key_id, model, shard)
        GROUP BY n.day, n.model, n.shard ORDER BY n.day, n.model, n.shard
        ON CONFLICT (day, model, shard) DO UPDATE SET
            requests = r.requests + excluded.requests,
            partial_requests = r.partial_requests + excluded.partial_requests,
            unpriced_requests = r.unpriced_requests + excluded.unpriced_requests,
            input_tokens = r.input_tokens + excluded.input_tokens,
            output_tokens = r.output_tokens + excluded.output_tokens,
            cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
            cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
            cost_micros = r.cost_micros + excluded.cost_micros,
            cost_pico = r.cost_pico + excluded.cost_pico;
    INSERT INTO usage_daily_users AS r (day, user_id, model, shard, requests, partial_requests, unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, cost_pico)
        SELECT n.day, n.user_id, n.model, n.shard, sum(n.requests - o.requests), sum(n.partial_requests - o.partial_requests), sum(n.unpriced_requests - o.unpriced_requests), sum(n.input_tokens - o.input_tokens), sum(n.output_tokens - o.output_tokens), sum(n.cache_write_tokens - o.cache_write_tokens), sum(n.cache_read_tokens - o.cache_read_tokens), sum(n.cost_micros - o.cost_micros), sum(n.cost_pico - o.cost_pico)
        FROM new_rows n JOIN old_rows o USING (day, user_id, key_id, model, shard)
        GROUP BY n.day, n.user_id, n.model, n.shard ORDER BY n.day, n.user_id, n.model, n.shard
        ON CONFLICT (day, user_id, model, shard) DO UPDATE SET
            requests = r.requests + excluded.requests,
            partial_requests = r.partial_requests + excluded.partial_requests,
            unpriced_requests = r.unpriced_requests + excluded.unpriced_requests,
            input_tokens = r.input_tokens + excluded.input_tokens,
            output_tokens = r.output_tokens + excluded.output_tokens,
            cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
            cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
            cost_micros = r.cost_micros + excluded.cost_micros,
            cost_pico = r.cost_pico + excluded.cost_pico;
    INSERT INTO usage_monthly_keys AS r (month, user_id, key_id, shard, requests, partial_requests, unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, cost_pico)
        SELECT date_trunc('month', n.day)::date, n.user_id, n.key_id, n.shard, sum(n.requests - o.requests), sum(n.partial_requests - o.partial_requests), sum(n.unpriced_requests - o.unpriced_requests), sum(n.input_tokens - o.input_tokens), sum(n.output_tokens - o.output_tokens), sum(n.cache_write_tokens - o.cache_write_tokens), sum(n.cache_read_tokens - o.cache_read_tokens), sum(n.cost_micros - o.cost_micros), sum(n.cost_pico - o.cost_pico)
        FROM new_rows n JOIN old_rows o USING (day, user_id, key_id, model, shard)
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (month, user_id, key_id, shard) DO UPDATE SET
            requests = r.requests + excluded.requests,
            partial_requests = r.partial_requests + excluded.partial_requests,
            unpriced_requests = r.unpriced_requests + excluded.unpriced_requests,
            input_tokens = r.input_tokens + excluded.input_tokens,
            output_tokens = r.output_tokens + excluded.output_tokens,
            cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
            cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
            cost_micros = r.cost_micros + excluded.cost_micros,
            cost_pico = r.cost_pico + excluded.cost_pico;
    RETURN NULL;
END $$;

-- The ledger writer's INSERT ... ON CONFLICT DO UPDATE fires both: new rows
-- through the first, the increments of existing rows (new - old) through the second.
CREATE TRIGGER usage_daily_fanout_insert AFTER INSERT ON usage_daily
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_daily_fanout_insert();
CREATE TRIGGER usage_daily_fanout_update AFTER UPDATE ON usage_daily
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_daily_fanout_update();

-- What was recorded before this migration.
INSERT INTO usage_daily_totals (day, model, shard, requests, partial_requests, unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, cost_pico)
    SELECT day, model, shard, sum(requests), sum(partial_requests), sum(unpriced_requests), sum(input_tokens), sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_micros), sum(cost_pico) FROM usage_daily GROUP BY day, model, shard;
INSERT INTO usage_daily_users (day, user_id, model, shard, requests, partial_requests, unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, cost_pico)
    SELECT day, user_id, model, shard, sum(requests), sum(partial_requests), sum(unpriced_requests), sum(input_tokens), sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_micros), sum(cost_pico) FROM usage_daily GROUP BY day, user_id, model, shard;
INSERT INTO usage_monthly_keys (month, user_id, key_id, shard, requests, partial_requests, unpriced_requests, input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_micros, cost_pico)
    SELECT date_trunc('month', day)::date, user_id, key_id, shard, sum(requests), sum(partial_requests), sum(unpriced_requests), sum(input_tokens), sum(output_tokens), sum(cache_write_tokens), sum(cache_read_tokens), sum(cost_micros), sum(cost_pico)
    FROM usage_daily GROUP BY 1, 2, 3, 4;
