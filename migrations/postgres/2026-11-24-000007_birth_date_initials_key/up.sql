-- Re-keying for the blocking key added with this migration: birth date + both initials, in
-- either order (`di:YYYY-MM-DD:ab`, `Demographics::blocking_keys`). Active records only, as
-- `stored_keys` files them; computed from the stored normalised demographics. Initials are
-- ordered by code point (COLLATE "C"), as Rust orders chars.
INSERT INTO blocking_keys (key, source_id)
SELECT 'di:' || d || ':' || CASE WHEN gi COLLATE "C" <= fi COLLATE "C" THEN gi || fi ELSE fi || gi END, id
FROM (
    SELECT id,
        demographics::jsonb ->> 'birth_date' AS d,
        substr(demographics::jsonb ->> 'given', 1, 1) AS gi,
        substr(demographics::jsonb ->> 'family', 1, 1) AS fi
    FROM source_records
    WHERE status = 'active'
) AS s
WHERE d IS NOT NULL AND gi IS NOT NULL AND gi <> '' AND fi IS NOT NULL AND fi <> ''
ON CONFLICT DO NOTHING;
