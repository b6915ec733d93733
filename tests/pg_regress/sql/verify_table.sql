-- audit.baseline and audit.verify_table: the log proves the table's current
-- state, so a change made behind the trigger's back is caught.
CREATE EXTENSION IF NOT EXISTS audit_ext;
CREATE TABLE vt_accounts (id int PRIMARY KEY, owner text, balance numeric, pin text, note text);
INSERT INTO vt_accounts SELECT g, 'owner ' || g, g * 10.50, 'pin' || g, 'n' FROM generate_series(1, 10) g;
CREATE TEMP TABLE marks (name text PRIMARY KEY, at timestamptz);

-- Tracked without a baseline: rows that predate tracking are unexplained, and the detail says why.
SELECT audit.track('vt_accounts', exclude => '{note}', redact => '{pin}');
SELECT * FROM audit.verify_table('vt_accounts');

-- A baseline: one SNAPSHOT per row, the whole row (excluded column left out,
-- redacted one as its marker); a re-run writes nothing.
INSERT INTO marks VALUES ('before_baseline', clock_timestamp());
SELECT pg_sleep(0.01);
SELECT audit.baseline('vt_accounts');
SELECT audit.baseline('vt_accounts', batch_size => 3);
SELECT operation, count(*) FROM audit.log WHERE table_name = 'vt_accounts' GROUP BY operation ORDER BY operation;
SELECT new_values - 'pin' AS snapshot, new_values->>'pin' ~ '^redacted:' AS pin_marked
  FROM audit.log WHERE table_name = 'vt_accounts' AND row_id = '7';
SELECT * FROM audit.verify_table('vt_accounts');

-- Ordinary changes keep it ok, also inside the verifying transaction.
UPDATE vt_accounts SET balance = 1 WHERE id = 1;
BEGIN;
UPDATE vt_accounts SET owner = 'new owner' WHERE id = 2;
DELETE FROM vt_accounts WHERE id = 3;
INSERT INTO vt_accounts VALUES (11, 'eleven', 0, 'p', 'n');
SELECT ok, rows_checked FROM audit.verify_table('vt_accounts');
ROLLBACK;

-- history shows the SNAPSHOT as the row's first event; state_at and table_at
-- answer from it for a row that predates tracking.
SELECT operation, new_values->>'balance' AS balance, state->>'balance' AS state_balance
  FROM audit.history('vt_accounts', '1') ORDER BY id;
SELECT audit.state_at('vt_accounts', '7', (SELECT at FROM marks)) - 'pin' AS seven_before_baseline;
SELECT audit.state_at('vt_accounts', '1', (SELECT at FROM marks))->>'balance' AS one_before_baseline;
SELECT j->>'id' AS id, j->>'balance' AS balance
  FROM audit.table_at('vt_accounts', (SELECT at FROM marks)) j ORDER BY (j->>'id')::int;

-- Excluded columns are not compared.
SET session_replication_role = replica;
UPDATE vt_accounts SET note = 'quiet' WHERE id = 2;
RESET session_replication_role;
SELECT ok FROM audit.verify_table('vt_accounts');

-- Each change behind the trigger is caught (each rolled back afterwards).
BEGIN;
SET LOCAL session_replication_role = replica;
UPDATE vt_accounts SET balance = 1000000 WHERE id = 7;
SELECT * FROM audit.verify_table('vt_accounts');
ROLLBACK;
BEGIN;
SET LOCAL session_replication_role = replica;
INSERT INTO vt_accounts VALUES (99, 'ghost', 5, 'p', 'n');
SELECT * FROM audit.verify_table('vt_accounts');
ROLLBACK;
BEGIN;
SET LOCAL session_replication_role = replica;
DELETE FROM vt_accounts WHERE id = 5;
SELECT * FROM audit.verify_table('vt_accounts');
ROLLBACK;
-- A redacted column is compared through its marker.
BEGIN;
SET LOCAL session_replication_role = replica;
UPDATE vt_accounts SET pin = 'guessed' WHERE id = 4;
SELECT ok, changed, first_bad_row_id, detail FROM audit.verify_table('vt_accounts');
ROLLBACK;
-- The exact text counts: 70.50 and 70.5 are equal numbers but not the logged value.
BEGIN;
SET LOCAL session_replication_role = replica;
UPDATE vt_accounts SET balance = 70.5 WHERE id = 7;
SELECT ok, changed, first_bad_row_id FROM audit.verify_table('vt_accounts');
ROLLBACK;
-- A key change: the old key is missing, the new one unexplained.
BEGIN;
SET LOCAL session_replication_role = replica;
UPDATE vt_accounts SET id = 100 WHERE id = 4;
SELECT * FROM audit.verify_table('vt_accounts');
ROLLBACK;
-- A deleted row put back behind the trigger.
DELETE FROM vt_accounts WHERE id = 10;
BEGIN;
SET LOCAL session_replication_role = replica;
INSERT INTO vt_accounts VALUES (10, 'owner 10', 105.00, 'pin10', 'n');
SELECT ok, unexplained, first_bad_row_id, detail FROM audit.verify_table('vt_accounts');
ROLLBACK;
-- A TRUNCATE with triggers off: every row the log holds is missing.
BEGIN;
SET LOCAL session_replication_role = replica;
TRUNCATE vt_accounts;
SELECT ok, rows_checked, missing FROM audit.verify_table('vt_accounts');
ROLLBACK;
-- A logged TRUNCATE is history, not tampering; rows after it are explained by their INSERTs.
BEGIN;
TRUNCATE vt_accounts;
INSERT INTO vt_accounts VALUES (1, 'again', 1, 'p', 'n');
SELECT ok, rows_checked FROM audit.verify_table('vt_accounts');
SELECT audit.baseline('vt_accounts');
ROLLBACK;
-- ALTER TABLE ... DISABLE TRIGGER is recorded as DDL, and what it let through is caught.
BEGIN;
ALTER TABLE vt_accounts DISABLE TRIGGER audit_capture_row;
UPDATE vt_accounts SET owner = 'quiet' WHERE id = 6;
ALTER TABLE vt_accounts ENABLE TRIGGER audit_capture_row;
SELECT new_values->>'statement' AS ddl FROM audit.log WHERE table_name = 'vt_accounts' AND operation = 'DDL' ORDER BY id;
SELECT ok, changed, first_bad_row_id FROM audit.verify_table('vt_accounts');
ROLLBACK;

-- verify() proves the log and, when given tables, the tables too.
SELECT audit.seal() > 0 AS sealed;
-- (Only the tables' part of the detail: the chain's counts depend on the files before this one.)
SELECT ok, split_part(detail, '; tables: ', 2) AS tables FROM audit.verify(tables => ARRAY['vt_accounts'::regclass]);
BEGIN;
SET LOCAL session_replication_role = replica;
UPDATE vt_accounts SET balance = 0 WHERE id = 8;
SELECT ok, first_bad_id, split_part(detail, '; tables: ', 2) AS tables
  FROM audit.verify(tables => ARRAY['vt_accounts'::regclass]);
SELECT ok FROM audit.verify();
ROLLBACK;

-- undo after a baseline: a change is undone, the baseline never is.
UPDATE vt_accounts SET owner = 'mistake' WHERE id = 9;
SELECT audit.undo((SELECT txid FROM audit.log WHERE table_name = 'vt_accounts' AND row_id = '9' AND operation = 'UPDATE'));
SELECT owner FROM vt_accounts WHERE id = 9;
SELECT ok FROM audit.verify_table('vt_accounts');
\set VERBOSITY sqlstate
SELECT audit.undo((SELECT txid FROM audit.log WHERE table_name = 'vt_accounts' AND operation = 'SNAPSHOT' LIMIT 1));
\set VERBOSITY default

-- A partitioned table: a trigger disabled on one partition is caught under the parent.
CREATE TABLE vt_parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE vt_parted_a PARTITION OF vt_parted FOR VALUES FROM (1) TO (100);
CREATE TABLE vt_parted_b PARTITION OF vt_parted FOR VALUES FROM (100) TO (200);
INSERT INTO vt_parted SELECT g, 'v' || g FROM generate_series(1, 199, 7) g;
SELECT audit.track('vt_parted', baseline => true);
SELECT ok, rows_checked FROM audit.verify_table('vt_parted');
ALTER TABLE vt_parted_b DISABLE TRIGGER audit_capture_row;
UPDATE vt_parted SET v = 'quiet' WHERE id = 120;
ALTER TABLE vt_parted_b ENABLE TRIGGER audit_capture_row;
UPDATE vt_parted SET v = 'loud' WHERE id = 8;
SELECT * FROM audit.verify_table('vt_parted');

-- A composite key, and a column named like the alias the table is read under.
CREATE TABLE vt_pairs (a int, b text, r int, PRIMARY KEY (a, b));
INSERT INTO vt_pairs VALUES (1, 'x', 1), (1, 'y', 2), (2, 'x', 3);
SELECT audit.track('vt_pairs', baseline => true);
SELECT ok, rows_checked FROM audit.verify_table('vt_pairs');
SET session_replication_role = replica;
UPDATE vt_pairs SET r = 0 WHERE a = 1 AND b = 'y';
RESET session_replication_role;
SELECT ok, changed, first_bad_row_id FROM audit.verify_table('vt_pairs');

-- Refusals.
SELECT audit.baseline('vt_accounts', batch_size => 0);
SELECT * FROM audit.verify_table(NULL);
CREATE TABLE vt_untracked (id int PRIMARY KEY);
SELECT * FROM audit.verify_table('vt_untracked');
SELECT audit.baseline('vt_untracked');
CREATE TABLE vt_keyless (v int);
SELECT audit.track('vt_keyless');
SELECT * FROM audit.verify_table('vt_keyless');
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT audit.baseline('vt_accounts');
ROLLBACK;
-- verify_table needs SELECT on the table, baseline its ownership.
CREATE ROLE audit_regress_auditor;
GRANT USAGE ON SCHEMA audit TO audit_regress_auditor;
GRANT EXECUTE ON FUNCTION audit.verify_table(regclass), audit.baseline(regclass, integer) TO audit_regress_auditor;
SET ROLE audit_regress_auditor;
SELECT * FROM audit.verify_table('vt_accounts');
RESET ROLE;
GRANT SELECT ON vt_accounts TO audit_regress_auditor;
SET ROLE audit_regress_auditor;
SELECT ok, rows_checked FROM audit.verify_table('vt_accounts');
SELECT audit.baseline('vt_accounts');
RESET ROLE;
REVOKE ALL ON vt_accounts FROM audit_regress_auditor;
-- User code never runs as the extension owner: a cast to json inside the table's
-- row image runs as whoever verifies. Logged as its owner wrote it, the row
-- verifies for that owner; run as anyone else, the image would differ.
CREATE ROLE audit_regress_vt_mallory;
CREATE SCHEMA vt_mallory AUTHORIZATION audit_regress_vt_mallory;
SET ROLE audit_regress_vt_mallory;
CREATE TYPE vt_mallory.feeling AS ENUM ('ok');
CREATE FUNCTION vt_mallory.feeling_json(vt_mallory.feeling) RETURNS json LANGUAGE sql
  AS $$ SELECT pg_catalog.json_build_object('ran_as', current_user::text) $$;
CREATE CAST (vt_mallory.feeling AS json) WITH FUNCTION vt_mallory.feeling_json(vt_mallory.feeling);
CREATE TABLE vt_mallory.moods (id int PRIMARY KEY, f vt_mallory.feeling);
RESET ROLE;
SELECT audit.track('vt_mallory.moods');
SET ROLE audit_regress_vt_mallory;
INSERT INTO vt_mallory.moods VALUES (1, 'ok');
RESET ROLE;
SELECT new_values FROM audit.log WHERE table_name = 'moods' AND schema_name = 'vt_mallory';
GRANT USAGE ON SCHEMA audit TO audit_regress_vt_mallory;
GRANT EXECUTE ON FUNCTION audit.verify_table(regclass) TO audit_regress_vt_mallory;
SET ROLE audit_regress_vt_mallory;
SELECT ok, rows_checked FROM audit.verify_table('vt_mallory.moods');
RESET ROLE;
SELECT ok, changed, detail FROM audit.verify_table('vt_mallory.moods');
REVOKE ALL ON FUNCTION audit.verify_table(regclass) FROM audit_regress_vt_mallory;
REVOKE ALL ON SCHEMA audit FROM audit_regress_vt_mallory;
SELECT audit.untrack('vt_mallory.moods');
DROP SCHEMA vt_mallory CASCADE;
DROP ROLE audit_regress_vt_mallory;
REVOKE ALL ON FUNCTION audit.verify_table(regclass), audit.baseline(regclass, integer) FROM audit_regress_auditor;
REVOKE ALL ON SCHEMA audit FROM audit_regress_auditor;
DROP ROLE audit_regress_auditor;
SELECT audit.untrack('vt_keyless');
DROP TABLE vt_untracked, vt_keyless;

-- With a parallel plan (made cheap here), the table's side is read and sorted by
-- workers while the merge runs in the leader: the workers see the caller's own
-- uncommitted changes, so those count as the trigger's and the rest as tampering.
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
CREATE TABLE vt_par (id int PRIMARY KEY, v text);
INSERT INTO vt_par SELECT g, 'v' || g FROM generate_series(1, 3000) g;
ANALYZE vt_par;
SELECT audit.track('vt_par', baseline => true);
-- The shape of the table's side, as verify_table reads it: in parallel.
EXPLAIN (COSTS OFF) SELECT (r.id::text) COLLATE "C" AS k, r FROM vt_par r ORDER BY 1;
SELECT ok, rows_checked, missing, unexplained, changed FROM audit.verify_table('vt_par');
BEGIN;
UPDATE vt_par SET v = 'through the trigger' WHERE id = 10;
DELETE FROM vt_par WHERE id = 20;
INSERT INTO vt_par VALUES (4000, 'through the trigger');
SET LOCAL session_replication_role = replica;
UPDATE vt_par SET v = 'behind the trigger' WHERE id = 30;
DELETE FROM vt_par WHERE id = 40;
INSERT INTO vt_par VALUES (5000, 'behind the trigger');
SELECT ok, rows_checked, missing, unexplained, changed, first_bad_row_id FROM audit.verify_table('vt_par');
ROLLBACK;
-- In changes mode, keys whose newest row is partial are folded by queries of
-- their own while the parallel query runs, in a transaction that has written too.
CREATE TABLE vt_parc (id int PRIMARY KEY, v text);
INSERT INTO vt_parc SELECT g, 'v' || g FROM generate_series(1, 3000) g;
ANALYZE vt_parc;
SELECT audit.track('vt_parc', capture => 'changes', baseline => true);
SET audit.image_every = 0;
UPDATE vt_parc SET v = 'partial' WHERE id % 100 = 0;
RESET audit.image_every;
SELECT count(*) FROM audit.log WHERE table_name = 'vt_parc' AND operation = 'UPDATE'
   AND new_values = '{"v": "partial"}';
BEGIN;
SELECT txid_current() > 0 AS wrote;
SELECT ok, rows_checked, missing, unexplained, changed FROM audit.verify_table('vt_parc');
SET LOCAL session_replication_role = replica;
UPDATE vt_parc SET v = 'behind the trigger' WHERE id = 500;
SELECT ok, rows_checked, changed, first_bad_row_id FROM audit.verify_table('vt_parc');
ROLLBACK;
SELECT audit.untrack('vt_parc');
DROP TABLE vt_parc;
-- An ERROR raised while a row is encoded inside the merge (here by a user's cast
-- to json) ends the call as that ERROR, and the next call works.
CREATE TYPE vt_flaky AS ENUM ('a');
CREATE FUNCTION vt_flaky_json(vt_flaky) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
  IF current_setting('vt.fail', true) = 'on' THEN
    RAISE EXCEPTION 'vt_flaky refuses';
  END IF;
  RETURN '"a"'::json;
END $$;
CREATE CAST (vt_flaky AS json) WITH FUNCTION vt_flaky_json(vt_flaky);
CREATE TABLE vt_flaky_t (id int PRIMARY KEY, f vt_flaky);
INSERT INTO vt_flaky_t SELECT g, 'a' FROM generate_series(1, 3000) g;
ANALYZE vt_flaky_t;
SELECT audit.track('vt_flaky_t', baseline => true);
SET vt.fail = 'on';
-- terse: the DETAIL carries a Rust backtrace when the server runs with RUST_BACKTRACE set.
\set VERBOSITY terse
SELECT ok FROM audit.verify_table('vt_flaky_t');
\set VERBOSITY default
RESET vt.fail;
SELECT ok, rows_checked, changed FROM audit.verify_table('vt_flaky_t');
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;
SELECT audit.untrack('vt_par');
SELECT audit.untrack('vt_flaky_t');
DROP TABLE vt_par, vt_flaky_t;
DROP CAST (vt_flaky AS json);
DROP FUNCTION vt_flaky_json(vt_flaky);
DROP TYPE vt_flaky;
