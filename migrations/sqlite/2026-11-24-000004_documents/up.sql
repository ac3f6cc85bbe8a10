-- The document registry (MHD): metadata of documents that stay in the members' repositories.
-- A document belongs to the source record (member patient) it was registered for, so it
-- follows that record through links, merges and unmerges of enterprise identities.
CREATE TABLE documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    master_id TEXT NOT NULL UNIQUE,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    source_id BIGINT NOT NULL REFERENCES source_records(id),
    list_id BIGINT,
    status TEXT NOT NULL,
    doc_date BIGINT,
    content_type TEXT NOT NULL,
    url TEXT NOT NULL,
    size BIGINT NOT NULL,
    hash TEXT NOT NULL,
    digest TEXT NOT NULL,
    resource TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX documents_source ON documents(source_id, doc_date);

-- SubmissionSets and Folders (FHIR List), ITI-66.
CREATE TABLE document_lists (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    master_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    source_id BIGINT NOT NULL REFERENCES source_records(id),
    status TEXT NOT NULL,
    list_date BIGINT,
    digest TEXT NOT NULL,
    resource TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX document_lists_source ON document_lists(source_id, list_date);
