-- Exact money (DESIGN.md "Usage and cost"): each ledger row's cost in pico-dollars
-- (10^-12 USD), an integer that never rounds.  Additive: cost_micros stays, and is
-- still written (each record rounded up to a micro-dollar) for the previous release.
--
-- A bigint holds ~9.2 million USD of pico-dollars: ample for one request.
-- Existing rows are backfilled from their micro-dollars (pico = micro * 10^6, the
-- rounded-up figure they were billed at).  Rows the previous release inserts during
-- a rolling upgrade carry no cost_pico: the trigger fills it the same way.
ALTER TABLE usage_ledger ADD COLUMN cost_pico bigint CHECK (cost_pico >= 0);

UPDATE usage_ledger SET cost_pico = cost_micros * 1000000 WHERE cost_pico IS NULL;

CREATE FUNCTION usage_fill_cost_pico() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.cost_pico := NEW.cost_micros::numeric * 1000000;
    RETURN NEW;
END
$$;

CREATE TRIGGER usage_ledger_fill_cost_pico BEFORE INSERT ON usage_ledger
    FOR EACH ROW WHEN (NEW.cost_pico IS NULL) EXECUTE FUNCTION usage_fill_cost_pico();

ALTER TABLE usage_ledger ALTER COLUMN cost_pico SET NOT NULL;
