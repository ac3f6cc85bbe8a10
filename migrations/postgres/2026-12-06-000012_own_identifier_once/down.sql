INSERT INTO source_identifiers (system, value, source_id)
SELECT system, value, id FROM source_records
ON CONFLICT DO NOTHING;
