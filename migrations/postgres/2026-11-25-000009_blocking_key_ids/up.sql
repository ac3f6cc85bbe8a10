-- Blocking keys are filed by a 64-bit hash of their text (`normalize::key_id`), not the text:
-- the key index shrinks by a third and its comparisons are integer ones. SQL has no FNV-1a,
-- so the keys filed so far are moved by the broker itself right after the migrations
-- (`db::rekey_blocking_keys`), from `blocking_keys_text`, which it then drops.
ALTER TABLE blocking_keys RENAME TO blocking_keys_text;
ALTER TABLE blocking_keys_text RENAME CONSTRAINT blocking_keys_pkey TO blocking_keys_text_pkey;
CREATE TABLE blocking_keys (
    key BIGINT NOT NULL,
    source_id BIGINT NOT NULL,
    PRIMARY KEY (key, source_id)
);
