-- Master patient index. An identity groups the source records (one per member identifier) that
-- belong to one person; matching looks candidates up by blocking key, never by scanning.
CREATE TABLE identities (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    status TEXT NOT NULL,
    merged_into BIGINT,
    golden TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE source_records (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    system TEXT NOT NULL,
    value TEXT NOT NULL,
    enterprise_id BIGINT NOT NULL REFERENCES identities(id),
    status TEXT NOT NULL,
    replaced_by BIGINT,
    link_kind TEXT NOT NULL,
    version BIGINT NOT NULL,
    resource TEXT NOT NULL,
    family TEXT,
    given TEXT,
    family_phonetic TEXT,
    given_phonetic TEXT,
    birth_date TEXT,
    gender TEXT,
    postcode TEXT,
    phone TEXT,
    demographics TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX source_records_identifier ON source_records(system, value);
CREATE INDEX source_records_enterprise ON source_records(enterprise_id);
CREATE INDEX source_records_family ON source_records(family);
CREATE INDEX source_records_given ON source_records(given);
CREATE INDEX source_records_family_phonetic ON source_records(family_phonetic);
CREATE INDEX source_records_birth_date ON source_records(birth_date);
CREATE INDEX source_records_postcode ON source_records(postcode);
CREATE INDEX source_records_phone ON source_records(phone);

-- Every identifier a source record carries (its own MRN, other own systems, shared ids).
CREATE TABLE source_identifiers (
    system TEXT NOT NULL,
    value TEXT NOT NULL,
    source_id BIGINT NOT NULL,
    PRIMARY KEY (system, value, source_id)
);
CREATE INDEX source_identifiers_source ON source_identifiers(source_id);

CREATE TABLE blocking_keys (
    key TEXT NOT NULL,
    source_id BIGINT NOT NULL,
    PRIMARY KEY (key, source_id)
);
CREATE INDEX blocking_keys_source ON blocking_keys(source_id);

-- Potential matches and potential duplicates awaiting an operator.
CREATE TABLE match_reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    source_a BIGINT NOT NULL,
    source_b BIGINT NOT NULL,
    kind TEXT NOT NULL,
    score REAL NOT NULL,
    breakdown TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    resolved_at BIGINT,
    resolved_by TEXT
);
CREATE UNIQUE INDEX match_reviews_pair ON match_reviews(source_a, source_b);
CREATE INDEX match_reviews_status ON match_reviews(status, id);

-- Pairs an operator declared different people: never linked automatically again.
CREATE TABLE non_matches (
    source_a BIGINT NOT NULL,
    source_b BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (source_a, source_b)
);
CREATE INDEX non_matches_b ON non_matches(source_b);

-- Each matching decision with its score breakdown, to explain it later.
CREATE TABLE match_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    source_id BIGINT NOT NULL,
    candidate_id BIGINT,
    outcome TEXT NOT NULL,
    score REAL,
    breakdown TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX match_decisions_source ON match_decisions(source_id, id);

-- Link changes of identities (link, unlink, merge, unmerge), for history and unmerge.
CREATE TABLE identity_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    enterprise_id BIGINT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    actor TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX identity_history_enterprise ON identity_history(enterprise_id, id);
