-- Partitions across boundaries with an hourly interval, the default partition, and retention.
-- In a database of its own: this test drops partitions on purpose.
CREATE DATABASE audit_parts;
\c audit_parts
SET client_min_messages = warning;
CREATE EXTENSION audit_ext;
RESET client_min_messages;
-- CREATE EXTENSION made the current partition and audit.premake (3) more.
SELECT count(*) AS ranged_partitions FROM pg_inherits
 WHERE inhparent = 'audit.log'::regclass AND inhrelid <> 'audit.log_default'::regclass;
SET audit.partition_interval = '1 hour';
SET audit.premake = 2;
SELECT jsonb_array_length(audit.maintain('2030-01-01 10:30+00')->'created') AS created;
SELECT audit.maintain('2030-01-01 10:30+00')->'created' AS created_again;
CREATE TABLE p (id int PRIMARY KEY, v text);
SELECT audit.track('p');
-- Audit data is guarded: no DROP or TRUNCATE without audit.allow_drop.
\set VERBOSITY sqlstate
DROP TABLE audit.log_p20300101_1000;
TRUNCATE audit.log;
TRUNCATE audit.log_p20300101_1000;
TRUNCATE audit.blocks;
\set VERBOSITY default
-- All ranged partitions dropped: writes still succeed into the default partition ...
SET audit.allow_drop = on;
DO $$
DECLARE r record;
BEGIN
  FOR r IN SELECT inhrelid::regclass AS part FROM pg_inherits
            WHERE inhparent = 'audit.log'::regclass AND inhrelid <> 'audit.log_default'::regclass LOOP
    EXECUTE format('DROP TABLE %s', r.part);
  END LOOP;
END $$;
RESET audit.allow_drop;
INSERT INTO p VALUES (1, 'a');
SELECT tableoid::regclass FROM audit.log WHERE table_name = 'p';
-- ... and maintain moves them out into a proper partition.
SELECT audit.maintain()->'moved_from_default' AS moved;
SELECT tableoid::regclass <> 'audit.log_default'::regclass AS moved_out FROM audit.log WHERE table_name = 'p';
SELECT audit.seal() AS sealed;
SELECT ok FROM audit.verify();
-- Stepping through time: partitions are made ahead, across day boundaries.
SELECT audit.maintain('2030-01-01 23:30+00')->'created' AS created;
-- Retention in detach mode, then drop mode; verify stays ok over what remains.
SET audit.retention = '1 day';
SET audit.retention_mode = 'detach';
SELECT audit.maintain('2030-01-03 00:00+00')->'retention' @> '[{"action": "detached", "partition": "log_p20300101_2300"}]' AS detached;
SELECT count(*) > 0 AS archived FROM pg_tables WHERE schemaname = 'audit_archive' AND tablename = 'log_p20300101_2300';
SELECT ok FROM audit.verify();
SET audit.retention_mode = 'drop';
SELECT jsonb_array_length(audit.maintain(now() + interval '10 days')->'retention') > 0 AS dropped;
SELECT count(*) AS rows_left FROM audit.log;
SELECT ok, blocks FROM audit.verify();
-- History before the retention horizon is refused with the earliest answerable time.
\set VERBOSITY sqlstate
SELECT audit.state_at('p', '1', '2030-01-01 00:00+00');
\set VERBOSITY default
-- Retention left allow_drop as it was.
SHOW audit.allow_drop;
-- DROP EXTENSION is refused while the log holds rows (here: the untrack's own DDL row),
-- unless a superuser allows it.
SELECT audit.untrack('p');
SET client_min_messages = warning;  -- the archived names depend on the hour
DROP SCHEMA audit_archive CASCADE;
RESET client_min_messages;
\set VERBOSITY sqlstate
DROP EXTENSION audit_ext;
\set VERBOSITY default
SELECT operation, new_values->>'command_tag' AS tag FROM audit.log;
SET audit.allow_drop = on;
SET client_min_messages = warning;
DROP EXTENSION audit_ext;
RESET client_min_messages;
RESET audit.allow_drop;
SELECT count(*) AS left_behind FROM pg_class WHERE relnamespace = 'audit'::regnamespace;
\c audit_ext_regress
DROP DATABASE audit_parts;
