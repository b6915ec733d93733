-- Upgrade test, last step (scripts/package-test upgrade): after ALTER EXTENSION
-- audit_ext UPDATE, every function of the extension works, on history written
-- by the previous release. psql variables: version (the new one), digest (taken
-- before the upgrade).
--
-- A function that is neither called here nor listed as internal fails the test:
-- add a call for it when you add one.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
CREATE FUNCTION pg_temp.check(ok boolean, what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF ok IS NOT TRUE THEN RAISE EXCEPTION 'check failed: %', what; END IF;
END $$;
CREATE FUNCTION pg_temp.refused(stmt text, state text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE stmt;
  RAISE EXCEPTION 'not refused: %', stmt;
EXCEPTION WHEN OTHERS THEN
  IF SQLSTATE <> state THEN RAISE EXCEPTION '% failed with % (%), not %', stmt, SQLSTATE, SQLERRM, state; END IF;
END $$;

SELECT pg_temp.check(false, 'functions not exercised by tests/packaging/api.sql: '
                            || pg_catalog.string_agg(p.oid::regprocedure::text, ', '))
  FROM pg_proc p
 WHERE p.pronamespace = 'audit'::regnamespace
   AND p.proname NOT IN (
         -- the API, called below
         'track', 'untrack', 'state_at', 'table_at', 'history', 'undo', 'seal', 'verify', 'digest',
         'maintain', 'version', 'status', 'baseline', 'verify_table',
         -- internal, exercised below through DML, DDL, DROP and TRUNCATE
         'capture', '_on_ddl', '_on_drop', '_on_drop_start', '_guard_truncate', '_guard_secret', '_record_ddl', '_check_drop',
         -- run by the upgrade script; a second call finds nothing left to adopt
         '_adopt_pruned')
HAVING count(*) > 0;

-- versions
SELECT pg_temp.check(extversion = :'version', 'extension version ' || extversion) FROM pg_extension WHERE extname = 'audit_ext';
SELECT pg_temp.check(v->>'extension_version' = :'version' AND v->>'library_version' = :'version', 'audit.version() = ' || v::text)
  FROM audit.version() v;

-- the logs' btrees, on partitions that 0.1.0's maintain() made too, do not deduplicate
SELECT pg_temp.check(count(*) = 0, 'log btrees that deduplicate: ' || string_agg(x.indexrelid::regclass::text, ', '))
  FROM pg_inherits i JOIN pg_index x ON x.indrelid = i.inhrelid JOIN pg_class c ON c.oid = x.indexrelid
 WHERE i.inhparent IN ('audit.log'::regclass, 'audit.access_log'::regclass)
   AND c.relam = (SELECT oid FROM pg_am WHERE amname = 'btree')
   AND NOT COALESCE('deduplicate_items=off' = ANY (c.reloptions), false);
SELECT pg_temp.check(count(*) >= 3, 'log partitions with btrees: ' || count(*))
  FROM pg_inherits i WHERE i.inhparent = 'audit.log'::regclass;

-- the history written before the upgrade
SELECT pg_temp.check(ok, 'verify(digest before the upgrade): ' || COALESCE(detail, '')) FROM audit.verify(:'digest');
SELECT pg_temp.check(ok, 'verify(): ' || COALESCE(detail, '')) FROM audit.verify();
SELECT pg_temp.check(count(*) = 3, 'history of users 1: ' || count(*)) FROM audit.history('users', '1');
SELECT pg_temp.check(audit.state_at('users', '1', now())->>'email' = 'late@example.com', 'state_at users 1');
SELECT pg_temp.check(audit.state_at('orders', '[103, "us"]', now())->>'total' = '4.5', 'state_at after a key change');
SELECT pg_temp.check(count(*) = 45, 'table_at users: ' || count(*)) FROM audit.table_at('users', now());
SELECT pg_temp.check(count(*) = 3, 'tracked_tables') FROM audit.tracked_tables;

-- undo a transaction made before the upgrade (users 1 gets its email back)
SELECT pg_temp.check(audit.undo(txid) = 1, 'undo of a pre-upgrade transaction')
  FROM audit.log WHERE table_name = 'users' AND row_id = '1' AND new_values->>'email' = 'late@example.com';
SELECT pg_temp.check(email = 'changed1@example.com', 'undone') FROM users WHERE id = 1;

-- new history with the new library: capture, the actor, undo with force
BEGIN;
SET LOCAL "app.current_user" = 'bob@corp';
UPDATE users SET email = 'bob-was-here@example.com' WHERE id = 2;
COMMIT;
SELECT pg_temp.check(changed_by = 'bob@corp' AND old_values->>'email' = 'changed2@example.com', 'capture after the upgrade')
  FROM audit.log WHERE table_name = 'users' AND row_id = '2' AND operation = 'UPDATE' ORDER BY id DESC LIMIT 1;
UPDATE users SET email = 'again@example.com' WHERE id = 2;
SELECT pg_temp.refused(format('SELECT audit.undo(%s)', txid), '40001')
  FROM audit.log WHERE table_name = 'users' AND changed_by = 'bob@corp';
SELECT pg_temp.check(audit.undo(txid, force => true) = 1, 'undo with force')
  FROM audit.log WHERE table_name = 'users' AND changed_by = 'bob@corp';

-- a baseline and the table's own proof, on a table made after the upgrade
CREATE TABLE ledger_t (id int PRIMARY KEY, v numeric);
INSERT INTO ledger_t SELECT g, g / 4.0 FROM generate_series(1, 30) g;
SELECT audit.track('ledger_t', baseline => true);
SELECT pg_temp.check(audit.baseline('ledger_t') = 0, 'a second baseline writes nothing');
SELECT pg_temp.check(ok AND rows_checked = 30, 'verify_table: ' || detail) FROM audit.verify_table('ledger_t');
SET session_replication_role = replica;
UPDATE ledger_t SET v = 0 WHERE id = 3;
RESET session_replication_role;
SELECT pg_temp.check(NOT ok AND changed = 1 AND first_bad_row_id = '3', 'verify_table catches: ' || detail)
  FROM audit.verify_table('ledger_t');
SELECT pg_temp.check(NOT ok, 'verify(tables) catches it too') FROM audit.verify(NULL, ARRAY['ledger_t'::regclass]);
UPDATE ledger_t SET v = 3 / 4.0 WHERE id = 3;
SELECT pg_temp.check(ok, 'verify_table after a logged repair: ' || detail) FROM audit.verify_table('ledger_t');

-- track and untrack, DDL records, drop protection
CREATE TABLE items (id int PRIMARY KEY, name text);
SELECT audit.track('items', redact => '{name}');
INSERT INTO items VALUES (1, 'one');
ALTER TABLE items ADD COLUMN price numeric;
SELECT audit.untrack('items');
SELECT pg_temp.check(count(*) FILTER (WHERE operation = 'INSERT' AND new_values->>'name' LIKE 'redacted:%') = 1
                     AND count(*) FILTER (WHERE new_values->>'command_tag' = 'ALTER TABLE') = 1
                     AND count(*) FILTER (WHERE new_values->>'command_tag' = 'audit.untrack') = 1,
                     'items: ' || pg_catalog.string_agg(operation || ' ' || COALESCE(new_values->>'command_tag', ''), ', '))
  FROM audit.log WHERE table_name = 'items';
DROP TABLE scratch;
SELECT pg_temp.check(count(*) = 1, 'DROP TABLE of a tracked table recorded')
  FROM audit.log WHERE table_name = 'scratch' AND operation = 'DDL' AND new_values->>'command_tag' = 'DROP TABLE';
SELECT pg_temp.refused('TRUNCATE audit.log', '55006');
SELECT pg_temp.refused('UPDATE audit.secret SET key = key', '42501');
SELECT pg_temp.refused('DELETE FROM audit.secret', '42501');
SELECT pg_temp.refused('TRUNCATE audit.secret', '42501');
SELECT pg_temp.refused('DROP EXTENSION audit_ext CASCADE', '55006');

-- maintenance and sealing, then the whole chain again
SELECT pg_temp.check(audit.maintain(now() + interval '40 days') ? 'created', 'maintain');
SELECT audit.seal();
SELECT audit.seal();
SELECT pg_temp.check((audit.digest()->>'through_id')::bigint >= (SELECT max(id) FROM audit.log), 'everything sealed');
SELECT pg_temp.check(ok, 'verify(new digest): ' || COALESCE(detail, '')) FROM audit.verify(audit.digest());
SELECT pg_temp.check(ok, 'verify(old digest): ' || COALESCE(detail, '')) FROM audit.verify(:'digest');
SELECT pg_temp.check(audit._adopt_pruned() = 0, 'nothing left to adopt after the upgrade');
SELECT pg_temp.check(seal_ok AND maintain_ok AND unsealed_rows = 0, 'status: ' || s::text) FROM audit.status() s;
-- renames are followed from the upgrade on
ALTER TABLE users RENAME TO users_renamed;
SELECT pg_temp.check(count(*) >= 3, 'history follows a rename: ' || count(*)) FROM audit.history('users_renamed', '1');
ALTER TABLE users_renamed RENAME TO users;
