-- Reads group, variant audit_ext: every statement that reads pgbench_accounts
-- is recorded in audit.access_log (changes are not: writes => false).
-- Settings at their defaults: audit.access_queue_size 2048,
-- audit.access_overflow block, audit.access_block_timeout 1s.
-- psql variable: db (this database's name).
SET client_min_messages = warning;
ALTER DATABASE :"db" SET pgaudit.log = 'none';
CREATE EXTENSION audit_ext;
SELECT audit.maintain();   -- access_log's partitions for now (see reads_setup_untracked.sql)
SELECT audit.track('pgbench_accounts', reads => true, writes => false);
