CREATE INDEX blocking_keys_source ON blocking_keys(source_id);
