-- Back to the street key's first form: postcode and the street's first two words.
DELETE FROM blocking_keys WHERE key LIKE 'ad:%';
INSERT OR IGNORE INTO blocking_keys (key, source_id)
SELECT 'ad:' || p || ':' || CASE
        WHEN sp = 0 OR instr(substr(s, sp + 1), ' ') = 0 THEN s
        ELSE substr(s, 1, sp + instr(substr(s, sp + 1), ' ') - 1)
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
