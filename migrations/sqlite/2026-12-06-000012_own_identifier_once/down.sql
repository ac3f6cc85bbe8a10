INSERT OR IGNORE INTO source_identifiers (system, value, source_id)
SELECT system, value, id FROM source_records;
