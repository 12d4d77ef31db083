-- Who changed what in the control plane, and when.  Never holds a secret.
CREATE TABLE audit_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    actor_id     uuid,                      -- NULL: bootstrap token or CLI
    actor        text NOT NULL,             -- 'user' | 'bootstrap' | 'cli'
    action       text NOT NULL,             -- e.g. 'user.create', 'key.revoke'
    target_type  text NOT NULL,
    target_id    text NOT NULL,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb,
    request_id   text,
    ip           text
);

CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_target ON audit_log (target_type, target_id);
