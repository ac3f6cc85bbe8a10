DROP TABLE identity_history;
DROP TABLE match_decisions;
DROP TABLE non_matches;
DROP TABLE match_reviews;
DROP TABLE blocking_keys;
DROP TABLE source_identifiers;
DROP TABLE source_records;
DROP TABLE identities;
