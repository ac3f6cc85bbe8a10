-- Old keys are recomputed from a record's stored demographics and deleted by primary key,
-- so this second index (nine entries per record) only cost writes.
DROP INDEX blocking_keys_source;
