DROP TABLE consents;
ALTER TABLE audit_events DROP COLUMN break_glass;
