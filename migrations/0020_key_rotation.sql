-- Key rotation: a rotated key gets a new secret (new key_hash and prefix on
-- its row, so it keeps its id, limits, counters and budget history); the old
-- secret's hash moves here and keeps working until valid_until (the grace
-- period chosen per rotation).  Lookups past valid_until find nothing.
CREATE TABLE access_key_previous_hashes (
    key_hash     text PRIMARY KEY CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    key_id       uuid NOT NULL REFERENCES access_keys (id) ON DELETE CASCADE,
    prefix       text NOT NULL,
    valid_until  timestamptz NOT NULL,
    rotated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX access_key_previous_hashes_key ON access_key_previous_hashes (key_id);

-- Ending a grace period early (a second rotation shortens the first's) must
-- reach every worker's cache like any other key change.
CREATE FUNCTION gateway_notify_previous_hash() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gateway_principals', 'k:' || OLD.key_id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER access_key_previous_hashes_notify
    AFTER UPDATE OF valid_until OR DELETE
    ON access_key_previous_hashes FOR EACH ROW EXECUTE FUNCTION gateway_notify_previous_hash();
