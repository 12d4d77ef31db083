-- Teams: a team has members (users; a user belongs to at most one team, hence
-- users.team_id), its own limits (same JSON shape as a user's: rpm, tpm,
-- max_concurrency, budget_usd/budget_period, models) and optional per-model
-- budgets: {"<model or glob>": {"budget_usd": 10, "budget_period": "month"}}.
CREATE TABLE teams (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name           text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    limits         jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(limits) = 'object'),
    model_budgets  jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(model_budgets) = 'object'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz
);

CREATE UNIQUE INDEX teams_name_live ON teams (name) WHERE deleted_at IS NULL;
CREATE INDEX teams_created ON teams (created_at, id);

ALTER TABLE users ADD COLUMN team_id uuid REFERENCES teams (id);
CREATE INDEX users_team ON users (team_id) WHERE team_id IS NOT NULL;

-- team_admin: manages the users and keys of its own team only.
ALTER TABLE users DROP CONSTRAINT users_role_check;
ALTER TABLE users ADD CONSTRAINT users_role_check CHECK (role IN ('admin', 'user', 'team_admin'));

-- Moving a user between teams changes its keys' principals on every worker.
CREATE TRIGGER users_team_notify
    AFTER UPDATE OF team_id ON users FOR EACH ROW EXECUTE FUNCTION gateway_notify_user();

-- A team's limits change: every member's cached principals are dropped.
CREATE FUNCTION gateway_notify_team() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gateway_principals', 'u:' || u.id::text) FROM users u WHERE u.team_id = OLD.id;
    RETURN NULL;
END $$;

CREATE TRIGGER teams_notify
    AFTER UPDATE OF limits, model_budgets, deleted_at OR DELETE
    ON teams FOR EACH ROW EXECUTE FUNCTION gateway_notify_team();
