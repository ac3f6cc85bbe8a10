-- Re-keying for the street key's new form: postcode, the street's first word and the second
-- word's initial (`ad:POSTCODE:12 m`, `Demographics::blocking_keys`), so a typo in the street
-- name no longer hides the record. Active records only, as `stored_keys` files them; computed
-- from the stored normalised demographics (words are separated by one space there).
DELETE FROM blocking_keys WHERE key LIKE 'ad:%';
INSERT OR IGNORE INTO blocking_keys (key, source_id)
SELECT 'ad:' || p || ':' || CASE
        WHEN sp = 0 THEN s
        WHEN substr(s, sp + 1, 1) = '' THEN substr(s, 1, sp - 1)
        ELSE substr(s, 1, sp - 1) || ' ' || substr(s, sp + 1, 1)
    END, id
FROM (
    SELECT id, s, p, instr(s, ' ') AS sp
    FROM (
        SELECT id,
            json_extract(demographics, '$.street') AS s,
            json_extract(demographics, '$.postcode') AS p
        FROM source_records
        WHERE status = 'active'
    )
)
WHERE s IS NOT NULL AND p IS NOT NULL;
