-- PostgreSQL only: SQLite's text columns already compare bytes (BINARY), which PDQm's prefix
-- ranges need.
SELECT 1;
