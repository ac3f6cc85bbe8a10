CREATE INDEX source_records_phone ON source_records(phone);
