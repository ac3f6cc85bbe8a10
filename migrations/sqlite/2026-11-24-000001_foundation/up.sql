-- Member organisations, their certificates and the identifier systems they own.
CREATE TABLE organizations (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    org_type TEXT NOT NULL,
    status TEXT NOT NULL,
    fhir_base TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE org_certificates (
    fingerprint TEXT PRIMARY KEY NOT NULL,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    subject TEXT NOT NULL,
    serial TEXT NOT NULL,
    not_after BIGINT NOT NULL,
    added_at BIGINT NOT NULL
);
CREATE INDEX org_certificates_org ON org_certificates(org_id);

CREATE TABLE org_identifier_systems (
    system TEXT PRIMARY KEY NOT NULL,
    org_id TEXT NOT NULL REFERENCES organizations(id)
);
CREATE INDEX org_identifier_systems_org ON org_identifier_systems(org_id);

-- The append-only, hash-chained audit trail. audit_head holds the end of the chain; every
-- writer updates it first, which serialises appends across connections and processes.
CREATE TABLE audit_events (
    seq BIGINT PRIMARY KEY NOT NULL,
    recorded_at BIGINT NOT NULL,
    org_id TEXT,
    user_id TEXT,
    user_role TEXT,
    purpose TEXT,
    client_addr TEXT,
    request_id TEXT,
    event_type TEXT NOT NULL,
    action TEXT NOT NULL,
    subtype TEXT NOT NULL,
    patient TEXT,
    entity TEXT,
    query TEXT,
    outcome TEXT NOT NULL,
    outcome_desc TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_events_recorded ON audit_events(recorded_at);
CREATE INDEX audit_events_org ON audit_events(org_id, seq);
CREATE INDEX audit_events_patient ON audit_events(patient, seq);

CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY NOT NULL,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
