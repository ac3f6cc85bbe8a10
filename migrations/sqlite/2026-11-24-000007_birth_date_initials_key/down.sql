DELETE FROM blocking_keys WHERE key LIKE 'di:%';
