-- Back to text keys. A hash cannot be turned back into its text: the table comes back empty,
-- and the earlier version finds no candidates among the records stored so far until the
-- members' records are fed again.
DROP TABLE IF EXISTS blocking_keys_text;
DROP TABLE blocking_keys;
CREATE TABLE blocking_keys (
    key TEXT NOT NULL,
    source_id BIGINT NOT NULL,
    PRIMARY KEY (key, source_id)
) WITHOUT ROWID;
