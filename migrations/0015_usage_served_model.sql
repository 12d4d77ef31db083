-- The model name the serving upstream received, beside the public name the
-- client sent (``model``): a route may map "smart" to "claude-sonnet-4-5" on
-- one provider and "anthropic.claude-sonnet-4-5-v1:0" on another.  Cost is
-- priced by this model.  '' on rows written before model mapping existed.
ALTER TABLE usage_ledger ADD COLUMN served_model text NOT NULL DEFAULT '';
