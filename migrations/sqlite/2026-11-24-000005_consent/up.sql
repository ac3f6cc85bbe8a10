-- Patients' consent directives (FHIR Consent), versioned: every change is a new row, the
-- previous version stays (is_current = 0). A directive belongs to the source record it was
-- recorded for, so it follows that record through links, merges and unmerges.
CREATE TABLE consents (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    consent_id BIGINT NOT NULL,
    version BIGINT NOT NULL,
    is_current BIGINT NOT NULL,
    source_id BIGINT NOT NULL REFERENCES source_records(id),
    org_id TEXT NOT NULL REFERENCES organizations(id),
    status TEXT NOT NULL,
    rule TEXT NOT NULL,
    -- Whom the directive hides the person from: '*' (opted out), ',org-a,org-b,' (organisations
    -- denied) or '' (nothing hidden: a permit or a category restriction).
    hides TEXT NOT NULL,
    resource TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (consent_id, version)
);
CREATE INDEX consents_source ON consents(source_id, is_current);

-- Break-the-glass accesses carry the stated reason (NULL otherwise); part of the hash chain
-- only when present, so earlier records verify unchanged.
ALTER TABLE audit_events ADD COLUMN break_glass TEXT;

-- The union of what the person's active directives hide, copied onto each of their records
-- (kept current on every consent change and every link change), so that PDQm leaves hidden
-- people out with a plain column test before counting and paging.
ALTER TABLE source_records ADD COLUMN consent_hides TEXT NOT NULL DEFAULT '';
