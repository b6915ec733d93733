-- Access auditing's SQL surface: track(reads, writes), the tracked_tables view,
-- the settings, and who may see audit.access_log. (The worker is paused here, so
-- no record is written: tests/access.rs covers the records themselves.)
\set VERBOSITY sqlstate
CREATE TABLE cards (id int PRIMARY KEY, pan text);
SELECT audit.track('cards', reads => true, writes => false);
SELECT table_name, writes, reads FROM audit.tracked_tables WHERE table_name = 'cards';
-- writes => false: no capture trigger, so changes are not logged.
SELECT count(*) AS capture_triggers FROM pg_trigger WHERE tgrelid = 'cards'::regclass AND NOT tgisinternal;
INSERT INTO cards VALUES (1, '4111');
SELECT count(*) AS logged FROM audit.log WHERE table_name = 'cards' AND operation <> 'DDL';
-- Re-running track replaces the options: now both.
SELECT audit.track('cards', reads => true);
SELECT table_name, writes, reads FROM audit.tracked_tables WHERE table_name = 'cards';
SELECT count(*) AS capture_triggers FROM pg_trigger WHERE tgrelid = 'cards'::regclass AND NOT tgisinternal;
-- Nothing to record, and NULL options, are refused.
SELECT audit.track('cards', reads => false, writes => false);
SELECT audit.track('cards', reads => NULL);
SELECT audit.track('cards', writes => NULL);
-- The settings refuse bad values when they are set.
SET audit.access_overflow = 'wait';
SET audit.access_overflow = 'ERROR';
SHOW audit.access_overflow;
RESET audit.access_overflow;
SET audit.access_block_timeout = '2min';
SET audit.access_parameter_max_size = -1;
SHOW audit.access_queue_size;
SET audit.access_queue_size = 100;
-- A role that may read the table may not read, or change, the record of its reads.
CREATE ROLE audit_regress_reader;
GRANT SELECT ON cards TO audit_regress_reader;
SET ROLE audit_regress_reader;
SELECT count(*) FROM cards;
SELECT count(*) FROM audit.access_log;
DELETE FROM audit.access_log;
RESET ROLE;
-- Nor may anyone truncate it without audit.allow_drop.
TRUNCATE audit.access_log;
SELECT audit.untrack('cards');
DROP TABLE cards;
DROP ROLE audit_regress_reader;
