-- A login attempt is reserved before its password is hashed, in one round
-- trip (gateway/auth/throttle.py): the subjects' rows (email, client IP) are
-- created if new and locked in one order; if any is locked the attempt is
-- refused (the seconds to wait are returned) and nothing is counted; else
-- each subject's count goes up (a new window starts at 1), and a subject
-- that reaches its limit is locked while this attempt is evaluated
-- (busy_s, at most its lockout); a failed evaluation then extends the lock.
CREATE FUNCTION login_reserve(subjects text[], limits int[], win interval, busy_s float8,
                              lockout_s float8, max_lock_s float8) RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    wait float8 := 0;
    cnt int;
BEGIN
    INSERT INTO login_throttle (subject, failures, window_start)
        SELECT s, 0, now() FROM unnest(subjects) AS s ORDER BY s
        ON CONFLICT (subject) DO NOTHING;
    FOR r IN SELECT subject, locked_until FROM login_throttle
             WHERE subject = ANY (subjects) ORDER BY subject FOR UPDATE LOOP
        IF r.locked_until > now() THEN
            wait := greatest(wait, extract(epoch FROM r.locked_until - now())::float8);
        END IF;
    END LOOP;
    IF wait > 0 THEN
        RETURN wait;
    END IF;
    FOR i IN 1 .. coalesce(array_length(subjects, 1), 0) LOOP
        UPDATE login_throttle AS t SET
            failures = CASE WHEN t.window_start < now() - win THEN 1 ELSE t.failures + 1 END,
            window_start = CASE WHEN t.window_start < now() - win THEN now() ELSE t.window_start END
        WHERE t.subject = subjects[i]
        RETURNING t.failures INTO cnt;
        IF cnt >= limits[i] THEN
            UPDATE login_throttle SET locked_until = now() + make_interval(
                secs => least(busy_s, max_lock_s, lockout_s * power(2, cnt - limits[i])))
            WHERE subject = subjects[i];
        END IF;
    END LOOP;
    RETURN 0;
END $$;
