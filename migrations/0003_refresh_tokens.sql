-- Opaque refresh tokens (hashed), rotated on every use.  All tokens of one
-- login share a family; presenting a spent token revokes the whole family.
CREATE TABLE refresh_tokens (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    family_id       uuid NOT NULL,
    user_id         uuid NOT NULL REFERENCES users (id),
    token_hash      text NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz,            -- rotated: spent
    revoked_at      timestamptz,
    revoked_reason  text
);

CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id) WHERE revoked_at IS NULL;
