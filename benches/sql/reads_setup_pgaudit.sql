-- Reads group, variant pgaudit: pgaudit's session logging of reads, set for
-- this database, as a DBA would set it. Every statement that reads a table
-- becomes one "AUDIT: SESSION,…,READ,SELECT,…" line in the server log, which
-- the cluster writes to files through logging_collector. audit_ext is not
-- created here.
-- psql variable: db (this database's name).
SET client_min_messages = warning;
CREATE EXTENSION pgaudit;
ALTER DATABASE :"db" SET pgaudit.log = 'read';
