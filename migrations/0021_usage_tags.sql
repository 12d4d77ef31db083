-- Tags for cost attribution: a key's default tags, and each usage record's
-- tags (NULL when it has none).  Reports filter with @> and group by
-- tags->>'name'; the GIN index serves the filters.
ALTER TABLE access_keys ADD COLUMN tags jsonb NOT NULL DEFAULT '{}'::jsonb
    CHECK (jsonb_typeof(tags) = 'object');

-- A change of a key's default tags reaches every worker's key cache.
CREATE TRIGGER access_keys_tags_notify
    AFTER UPDATE OF tags ON access_keys FOR EACH ROW EXECUTE FUNCTION gateway_notify_key();

ALTER TABLE usage_ledger ADD COLUMN tags jsonb;

CREATE INDEX usage_ledger_tags ON usage_ledger USING gin (tags);
