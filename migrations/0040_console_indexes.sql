-- The console's budgets page pages through the keys and users that have a
-- budget (keyset on created_at, id): with 100,000 keys and few budgets, these
-- partial indexes keep a page an index range scan instead of a table scan.
CREATE INDEX access_keys_budgeted ON access_keys (created_at, id)
    WHERE limits ? 'budget_usd' AND revoked_at IS NULL;
CREATE INDEX users_budgeted ON users (created_at, id)
    WHERE limits ? 'budget_usd' AND deleted_at IS NULL;
