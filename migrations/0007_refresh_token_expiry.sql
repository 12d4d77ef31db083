-- Expired sessions are purged now and then at login; this keeps that cheap.
CREATE INDEX refresh_tokens_expires ON refresh_tokens (expires_at);
