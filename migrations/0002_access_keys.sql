-- Access keys: only the SHA-256 of the key is stored, plus a display prefix.
CREATE TABLE access_keys (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid NOT NULL REFERENCES users (id),
    name          text NOT NULL DEFAULT '',
    key_hash      text NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    prefix        text NOT NULL,
    limits        jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(limits) = 'object'),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz,
    created_by    uuid,                     -- NULL: bootstrap token or CLI
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX access_keys_user ON access_keys (user_id, created_at, id);
CREATE INDEX access_keys_created ON access_keys (created_at, id);
