-- The bad-input catalogue: every case gets a clear error (shown as its SQLSTATE)
-- or a documented behaviour, and the log changes only where a write succeeded.
SELECT count(*) AS log_rows_before FROM audit.log \gset
\set VERBOSITY sqlstate
CREATE TABLE bi (id int PRIMARY KEY, a text, gone int);
ALTER TABLE bi DROP COLUMN gone;
SELECT audit.track('bi');
-- NULL arguments to every function: 22004, naming the argument (see errors.sql for the text).
SELECT audit.track(NULL, '{}', '{}');
SELECT audit.track('bi', NULL, '{}');
SELECT audit.track('bi', '{}', NULL);
SELECT audit.untrack(NULL);
SELECT audit.state_at(NULL, '1', now());
SELECT audit.state_at('bi', NULL, now());
SELECT audit.state_at('bi', '1', NULL);
SELECT * FROM audit.table_at(NULL, now());
SELECT * FROM audit.table_at('bi', NULL);
SELECT * FROM audit.history(NULL, '1');
SELECT * FROM audit.history('bi', NULL);
SELECT audit.undo(NULL);
SELECT audit.undo(1, NULL);
SELECT audit.maintain(NULL);
-- verify(NULL) is verify without a digest.
SELECT ok FROM audit.verify(NULL);
-- Unknown, dropped and system columns.
SELECT audit.track('bi', exclude => '{gone}');
SELECT audit.track('bi', redact => '{ctid}');
SELECT audit.track('bi', exclude => '{NULL}');
-- Objects that are not tables.
CREATE FOREIGN DATA WRAPPER bi_fdw;
CREATE SERVER bi_srv FOREIGN DATA WRAPPER bi_fdw;
CREATE FOREIGN TABLE bi_ft (x int) SERVER bi_srv;
SELECT audit.track('bi_ft');
CREATE INDEX bi_a ON bi (a);
SELECT audit.track('bi_a');
CREATE TYPE bi_comp AS (x int);
SELECT audit.track('bi_comp');
-- System catalogs and audit_ext's own tables.
SELECT audit.track('pg_catalog.pg_proc');
SELECT audit.track('information_schema.sql_features');
SELECT audit.track('audit.blocks');
SELECT audit.track('audit.log_default');
-- Unlogged tables can be tracked: their audit rows are WAL-logged like any other
-- (after a crash the table is empty, and the log keeps the vanished rows' history).
CREATE UNLOGGED TABLE bi_unlogged (id int PRIMARY KEY);
SELECT audit.track('bi_unlogged');
INSERT INTO bi_unlogged VALUES (1);
SELECT relpersistence FROM pg_class WHERE oid = 'audit.log_default'::regclass;
-- Key types: bytea, arrays, text with commas, quotes and newlines; json cannot be a key.
CREATE TABLE bi_json (j json PRIMARY KEY);
CREATE TABLE bi_keys (b bytea, arr int[], t text, PRIMARY KEY (b, arr, t));
SELECT audit.track('bi_keys');
INSERT INTO bi_keys VALUES ('\x00ff', '{1,2}', E'a,b "q" ''s''\nnext');
SELECT row_id FROM audit.log WHERE table_name = 'bi_keys';
SELECT audit.state_at('bi_keys', (SELECT row_id FROM audit.log WHERE table_name = 'bi_keys'), now()) ->> 't' = E'a,b "q" ''s''\nnext' AS key_round_trips;
CREATE TABLE bi_text (t text PRIMARY KEY, v int);
SELECT audit.track('bi_text');
INSERT INTO bi_text VALUES (E'x,"y"\n', 1);
UPDATE bi_text SET v = 2;
SELECT row_id = E'x,"y"\n' AS raw_single_key, audit.state_at('bi_text', row_id, now()) ->> 'v' AS v
  FROM audit.log WHERE table_name = 'bi_text' ORDER BY id DESC LIMIT 1;
-- A 100 MB row is logged whole.
CREATE TABLE bi_big (id int PRIMARY KEY, big text);
SELECT audit.track('bi_big');
INSERT INTO bi_big VALUES (1, repeat('x', 100 * 1024 * 1024));
SELECT octet_length(new_values ->> 'big') AS logged_bytes FROM audit.log WHERE table_name = 'bi_big';
-- Malformed app.current_user: used as a plain string, never a failed write.
SET "app.current_user" = '{"email": "a@b", ';
INSERT INTO bi VALUES (1, 'x');
SET "app.current_user" = '[1, 2]';
INSERT INTO bi VALUES (2, 'y');
SET "app.current_user" = '{"id": 7, "email": null}';
INSERT INTO bi VALUES (3, 'z');
RESET "app.current_user";
SELECT changed_by FROM audit.log WHERE table_name = 'bi' ORDER BY id;
-- Every bad value of every setting is refused at SET time.
SET audit.require_actor = maybe;
SET audit.allow_drop = 2;
SET audit.context_settings = 'app.x,,';
SET audit.context_settings = 'has space';
SET audit.partition_interval = '';
SET audit.partition_interval = '59 minutes';
SET audit.partition_interval = '-1 month';
SET audit.premake = 1001;
SET audit.premake = 'x';
SET audit.retention = '1 fortnight';
-- Values maintain() could not compute with are refused too.
SET audit.partition_interval = '100000 years';
SET audit.partition_interval = '101 years';
SET audit.retention = '10000 years';
SET audit.retention = '1001 years';
SET audit.retention_mode = '';
SET audit.naptime = 10;
SET audit.databases = 'a';
-- A role with no privileges at all gets 42501 from every function.
CREATE ROLE audit_regress_none;
SET ROLE audit_regress_none;
SELECT audit.track('bi');
SELECT audit.untrack('bi');
SELECT audit.state_at('bi', '1', now());
SELECT audit.table_at('bi', now());
SELECT audit.history('bi', '1');
SELECT audit.undo(1);
SELECT audit.seal();
SELECT audit.verify();
SELECT audit.digest();
SELECT audit.maintain();
SELECT * FROM audit.tracked_tables;
RESET ROLE;
DROP ROLE audit_regress_none;
\set VERBOSITY default
-- The log changed only by the writes above that succeeded: 1 unlogged, 1 key, 2 text,
-- 1 big, 3 bi.
SELECT count(*) - :log_rows_before AS new_log_rows FROM audit.log;
SELECT audit.untrack(t) FROM unnest(ARRAY['bi', 'bi_unlogged', 'bi_keys', 'bi_text', 'bi_big']::regclass[]) t;
DROP TABLE bi, bi_unlogged, bi_keys, bi_text, bi_big;
DROP FOREIGN TABLE bi_ft;
DROP SERVER bi_srv;
DROP FOREIGN DATA WRAPPER bi_fdw;
DROP TYPE bi_comp;
