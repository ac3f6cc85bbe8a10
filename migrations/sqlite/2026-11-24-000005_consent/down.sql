ALTER TABLE source_records DROP COLUMN consent_hides;
DROP TABLE consents;
ALTER TABLE audit_events DROP COLUMN break_glass;
