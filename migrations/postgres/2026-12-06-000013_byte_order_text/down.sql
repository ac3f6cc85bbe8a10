ALTER TABLE source_identifiers
    ALTER COLUMN system TYPE TEXT COLLATE "default",
    ALTER COLUMN value TYPE TEXT COLLATE "default";
ALTER TABLE source_records
    ALTER COLUMN system TYPE TEXT COLLATE "default",
    ALTER COLUMN value TYPE TEXT COLLATE "default",
    ALTER COLUMN family TYPE TEXT COLLATE "default",
    ALTER COLUMN given TYPE TEXT COLLATE "default",
    ALTER COLUMN family_phonetic TYPE TEXT COLLATE "default",
    ALTER COLUMN given_phonetic TYPE TEXT COLLATE "default",
    ALTER COLUMN birth_date TYPE TEXT COLLATE "default",
    ALTER COLUMN gender TYPE TEXT COLLATE "default",
    ALTER COLUMN postcode TYPE TEXT COLLATE "default",
    ALTER COLUMN phone TYPE TEXT COLLATE "default";
