-- OpenID Connect single sign-on.
--
-- oidc_logins: one row per login in progress, keyed by the SHA-256 of its
-- ``state``; holds the nonce and the PKCE verifier until the callback
-- consumes it (once) or it expires.  Any worker may receive the callback.
CREATE TABLE oidc_logins (
    state_hash     text PRIMARY KEY CHECK (state_hash ~ '^[0-9a-f]{64}$'),
    nonce          text NOT NULL,
    code_verifier  text NOT NULL,
    return_to      text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL
);

CREATE INDEX oidc_logins_expires ON oidc_logins (expires_at);

-- The identity provider's account (issuer, sub) behind a gateway user.
CREATE TABLE user_identities (
    issuer         text NOT NULL,
    subject        text NOT NULL,
    user_id        uuid NOT NULL REFERENCES users (id),
    email          text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_login_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (issuer, subject)
);

CREATE INDEX user_identities_user ON user_identities (user_id);
