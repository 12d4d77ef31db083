-- Failed logins per subject ('e:' || sha256(email), 'i:' || client ip), shared
-- by every worker so that throttling holds behind a load balancer.
CREATE TABLE login_throttle (
    subject       text PRIMARY KEY,
    failures      integer NOT NULL DEFAULT 0,
    window_start  timestamptz NOT NULL DEFAULT now(),
    locked_until  timestamptz
);
