-- Workers keep a filter of the hash prefixes of live keys, so that a flood of
-- random keys is told apart from real ones without a query (gateway/policy/
-- lookup_gate.py).  A key that becomes live (created, or given a new hash)
-- announces its prefix at once: 'n:<first 16 hex digits of key_hash>'.
CREATE FUNCTION gateway_notify_new_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.revoked_at IS NULL THEN
        PERFORM pg_notify('gateway_principals', 'n:' || substr(NEW.key_hash, 1, 16));
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER access_keys_notify_new
    AFTER INSERT OR UPDATE OF key_hash, revoked_at
    ON access_keys FOR EACH ROW EXECUTE FUNCTION gateway_notify_new_key();
