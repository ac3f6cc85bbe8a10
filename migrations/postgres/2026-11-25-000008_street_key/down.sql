-- Back to the street key's first form: postcode and the street's first two words.
DELETE FROM blocking_keys WHERE key LIKE 'ad:%';
INSERT INTO blocking_keys (key, source_id)
SELECT 'ad:' || p || ':' || CASE
        WHEN sp = 0 OR strpos(substr(s, sp + 1), ' ') = 0 THEN s
        ELSE substr(s, 1, sp + strpos(substr(s, sp + 1), ' ') - 1)
    END, id
FROM (
    SELECT id, s, p, strpos(s, ' ') AS sp
    FROM (
        SELECT id,
            demographics::jsonb ->> 'street' AS s,
            demographics::jsonb ->> 'postcode' AS p
        FROM source_records
        WHERE status = 'active'
    ) AS d
) AS w
WHERE s IS NOT NULL AND p IS NOT NULL
ON CONFLICT DO NOTHING;
