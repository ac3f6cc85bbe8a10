DROP TABLE audit_head;
DROP TABLE audit_events;
DROP TABLE org_identifier_systems;
DROP TABLE org_certificates;
DROP TABLE organizations;
