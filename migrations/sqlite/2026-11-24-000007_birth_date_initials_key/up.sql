-- Re-keying for the blocking key added with this migration: birth date + both initials, in
-- either order (`di:YYYY-MM-DD:ab`, `Demographics::blocking_keys`). Active records only, as
-- `stored_keys` files them; computed from the stored normalised demographics.
INSERT OR IGNORE INTO blocking_keys (key, source_id)
SELECT 'di:' || d || ':' || CASE WHEN gi <= fi THEN gi || fi ELSE fi || gi END, id
FROM (
    SELECT id,
        json_extract(demographics, '$.birth_date') AS d,
        substr(json_extract(demographics, '$.given'), 1, 1) AS gi,
        substr(json_extract(demographics, '$.family'), 1, 1) AS fi
    FROM source_records
    WHERE status = 'active'
)
WHERE d IS NOT NULL AND gi IS NOT NULL AND gi <> '' AND fi IS NOT NULL AND fi <> '';
