CREATE TABLE blocking_keys_rowid (
    key TEXT NOT NULL,
    source_id BIGINT NOT NULL,
    PRIMARY KEY (key, source_id)
);
INSERT INTO blocking_keys_rowid (key, source_id) SELECT key, source_id FROM blocking_keys;
DROP TABLE blocking_keys;
ALTER TABLE blocking_keys_rowid RENAME TO blocking_keys;

CREATE TABLE source_identifiers_rowid (
    system TEXT NOT NULL,
    value TEXT NOT NULL,
    source_id BIGINT NOT NULL,
    PRIMARY KEY (system, value, source_id)
);
INSERT INTO source_identifiers_rowid (system, value, source_id)
    SELECT system, value, source_id FROM source_identifiers;
DROP TABLE source_identifiers;
ALTER TABLE source_identifiers_rowid RENAME TO source_identifiers;
CREATE INDEX source_identifiers_source ON source_identifiers(source_id);
