-- Users of the gateway: admins and ordinary users, with their policy limits.
CREATE TABLE users (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email          text NOT NULL CHECK (email = lower(email) AND length(email) BETWEEN 3 AND 254),
    name           text NOT NULL DEFAULT '',
    password_hash  text,                    -- argon2id; NULL: cannot log in
    role           text NOT NULL DEFAULT 'user' CHECK (role IN ('admin', 'user')),
    disabled       boolean NOT NULL DEFAULT false,
    limits         jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(limits) = 'object'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz             -- soft delete: the usage ledger keeps pointing here
);

-- One live account per email; a deleted account frees its email.
CREATE UNIQUE INDEX users_email_live ON users (email) WHERE deleted_at IS NULL;
CREATE INDEX users_created ON users (created_at, id);
