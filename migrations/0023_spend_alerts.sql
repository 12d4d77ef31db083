-- Spend alerts: a rule watches one key, user or team against a budget (its
-- own budget_micros, or the target's configured budget when NULL) and fires
-- each threshold (percent) once per budget period.  Firing is an INSERT into
-- alert_events whose unique (rule, period, threshold) makes it exactly once
-- however many gateways evaluate at the same time; deliveries are claimed
-- with FOR UPDATE SKIP LOCKED and retried with backoff.
CREATE TABLE alert_rules (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    scope          text NOT NULL CHECK (scope IN ('key', 'user', 'team')),
    target_id      uuid NOT NULL,
    name           text NOT NULL DEFAULT '',
    budget_micros  bigint CHECK (budget_micros > 0),        -- NULL: the target's own budget
    period         text CHECK (period IN ('day', 'month', 'total')),  -- NULL: the target's budget period
    thresholds     integer[] NOT NULL,
    webhook_url    text NOT NULL,
    enabled        boolean NOT NULL DEFAULT true,
    created_by     uuid,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX alert_rules_target ON alert_rules (scope, target_id);
CREATE INDEX alert_rules_created ON alert_rules (created_at, id);

CREATE TABLE alert_events (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id          uuid NOT NULL REFERENCES alert_rules (id) ON DELETE CASCADE,
    period_start     timestamptz NOT NULL,
    threshold        integer NOT NULL,
    spend_micros     bigint NOT NULL,
    budget_micros    bigint NOT NULL,
    payload          jsonb NOT NULL,
    webhook_url      text NOT NULL,
    fired_at         timestamptz NOT NULL DEFAULT now(),
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status      integer,
    last_error       text,
    delivered_at     timestamptz,
    UNIQUE (rule_id, period_start, threshold)
);

CREATE INDEX alert_events_due ON alert_events (next_attempt_at) WHERE status = 'pending';
CREATE INDEX alert_events_rule ON alert_events (rule_id, id);
