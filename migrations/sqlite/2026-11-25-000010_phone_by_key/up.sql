-- PDQm's `telecom` search finds records through their phone blocking key (`ph:…`, filed for
-- every active record with a phone), so the phone column needs no index of its own: one
-- random index entry fewer for every record written.
DROP INDEX source_records_phone;
