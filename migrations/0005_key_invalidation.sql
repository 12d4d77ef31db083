-- Every change that can alter a cached principal notifies all gateway
-- workers (LISTEN gateway_principals): 'k:<key id>' or 'u:<user id>'.
-- last_used_at is written in batches and deliberately does not notify.
CREATE FUNCTION gateway_notify_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gateway_principals', 'k:' || OLD.id::text);
    RETURN NULL;
END $$;

CREATE FUNCTION gateway_notify_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gateway_principals', 'u:' || OLD.id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER access_keys_notify
    AFTER UPDATE OF user_id, name, key_hash, prefix, limits, expires_at, revoked_at OR DELETE
    ON access_keys FOR EACH ROW EXECUTE FUNCTION gateway_notify_key();

CREATE TRIGGER users_notify
    AFTER UPDATE OF limits, disabled, deleted_at OR DELETE
    ON users FOR EACH ROW EXECUTE FUNCTION gateway_notify_user();
