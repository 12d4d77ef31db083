-- Exact money in the daily and hourly rollups: cost_pico, a numeric sum of the
-- ledger's cost_pico (a bigint could overflow past ~9.2 million USD).  Additive:
-- cost_micros stays and is still maintained.
--
-- Backfilled from cost_micros.  The previous release's writer (during a rolling
-- upgrade) adds to cost_micros only: the triggers turn its inserts and increments
-- into pico-dollars too, so both columns stay complete whichever release wrote.
ALTER TABLE usage_daily ADD COLUMN cost_pico numeric;
ALTER TABLE usage_hourly ADD COLUMN cost_pico numeric;

UPDATE usage_daily SET cost_pico = cost_micros::numeric * 1000000 WHERE cost_pico IS NULL;
UPDATE usage_hourly SET cost_pico = cost_micros::numeric * 1000000 WHERE cost_pico IS NULL;

-- An old writer's increment: cost_micros moved, cost_pico did not.
CREATE FUNCTION usage_rollup_follow_micros() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.cost_pico := OLD.cost_pico + (NEW.cost_micros - OLD.cost_micros)::numeric * 1000000;
    RETURN NEW;
END
$$;

CREATE TRIGGER usage_daily_fill_cost_pico BEFORE INSERT ON usage_daily
    FOR EACH ROW WHEN (NEW.cost_pico IS NULL) EXECUTE FUNCTION usage_fill_cost_pico();
CREATE TRIGGER usage_hourly_fill_cost_pico BEFORE INSERT ON usage_hourly
    FOR EACH ROW WHEN (NEW.cost_pico IS NULL) EXECUTE FUNCTION usage_fill_cost_pico();
CREATE TRIGGER usage_daily_follow_micros BEFORE UPDATE ON usage_daily
    FOR EACH ROW WHEN (NEW.cost_micros IS DISTINCT FROM OLD.cost_micros AND NEW.cost_pico IS NOT DISTINCT FROM OLD.cost_pico)
    EXECUTE FUNCTION usage_rollup_follow_micros();
CREATE TRIGGER usage_hourly_follow_micros BEFORE UPDATE ON usage_hourly
    FOR EACH ROW WHEN (NEW.cost_micros IS DISTINCT FROM OLD.cost_micros AND NEW.cost_pico IS NOT DISTINCT FROM OLD.cost_pico)
    EXECUTE FUNCTION usage_rollup_follow_micros();

ALTER TABLE usage_daily ALTER COLUMN cost_pico SET NOT NULL;
ALTER TABLE usage_hourly ALTER COLUMN cost_pico SET NOT NULL;
