-- Reads group, variant untracked: audit_ext is installed and records the reads
-- of another table, but pgbench_accounts is not read-tracked. Every read still
-- passes through audit_ext's hook, which must find out that the table is not a
-- target: that lookup is what this variant measures (target: >= 0.99x none).
-- psql variable: db (this database's name).
SET client_min_messages = warning;
ALTER DATABASE :"db" SET pgaudit.log = 'none';
CREATE EXTENSION audit_ext;
-- The partitions for now, as the worker's round or a scheduled job makes them
-- (the harness's worker runs its round only once an hour).
SELECT audit.maintain();
CREATE TABLE reads_other (id int PRIMARY KEY, v text);
SELECT audit.track('reads_other', reads => true, writes => false);
