DROP INDEX source_records_identifier;
CREATE UNIQUE INDEX source_records_identifier ON source_records(system, value);
