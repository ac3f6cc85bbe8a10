-- SQLite only (WITHOUT ROWID); PostgreSQL tables are heaps with their indexes already.
SELECT 1;
