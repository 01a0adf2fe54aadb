-- Actions taken in other services reach the audit log as events, which may be delivered
-- twice: their key makes the second delivery write nothing.
ALTER TABLE audit_log ADD COLUMN source_key text;
CREATE UNIQUE INDEX audit_log_source_key ON audit_log (source_key) WHERE source_key IS NOT NULL;
