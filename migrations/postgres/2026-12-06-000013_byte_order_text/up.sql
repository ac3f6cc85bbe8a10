-- The demographic and identifier columns compare bytes (the C collation) whatever the
-- database's own collation is (often en_US.UTF-8 or C.UTF-8, which compare through the C
-- library's locale code). Two reasons:
-- * PDQm's prefix searches (`family=smi`) are the range [smi, smi + U+10FFFF): under a
--   linguistic collation that range is not the values starting with the prefix, and
--   PostgreSQL uses these indexes for a prefix only under C. Without it every such search
--   read the whole table (0.47 s at 1M patients).
-- * Every insert into their indexes compares strings: a byte comparison instead of the
--   locale's costs the bulk load's writer less.
-- Equality is unchanged (collations here are deterministic: equal means the same bytes). The
-- table is not rewritten; the indexes on these columns are rebuilt.
ALTER TABLE source_records
    ALTER COLUMN system TYPE TEXT COLLATE "C",
    ALTER COLUMN value TYPE TEXT COLLATE "C",
    ALTER COLUMN family TYPE TEXT COLLATE "C",
    ALTER COLUMN given TYPE TEXT COLLATE "C",
    ALTER COLUMN family_phonetic TYPE TEXT COLLATE "C",
    ALTER COLUMN given_phonetic TYPE TEXT COLLATE "C",
    ALTER COLUMN birth_date TYPE TEXT COLLATE "C",
    ALTER COLUMN gender TYPE TEXT COLLATE "C",
    ALTER COLUMN postcode TYPE TEXT COLLATE "C",
    ALTER COLUMN phone TYPE TEXT COLLATE "C";
ALTER TABLE source_identifiers
    ALTER COLUMN system TYPE TEXT COLLATE "C",
    ALTER COLUMN value TYPE TEXT COLLATE "C";
