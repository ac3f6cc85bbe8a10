-- A record's own identifier (the one it is stored under) is held by its row and the unique
-- `source_records_identifier` index; `source_identifiers` files only its other identifiers.
-- Filed in both, every record cost two more index entries on every write (three on
-- PostgreSQL, with the heap tuple). `identifiers_of` reads the own one from the row.
DELETE FROM source_identifiers
WHERE EXISTS (
    SELECT 1 FROM source_records r
    WHERE r.id = source_identifiers.source_id
      AND r.system = source_identifiers.system
      AND r.value = source_identifiers.value
);
