-- Clear errors with the right SQLSTATE, and nothing changed when they happen.
\set VERBOSITY sqlstate
CREATE TABLE t (id int PRIMARY KEY, a text);
SELECT audit.track('t', exclude => '{nope}');
SELECT audit.track('t', redact => '{"A"}');
SELECT audit.track('t', exclude => '{a}', redact => '{a}');
SELECT audit.track('missing_table');
CREATE VIEW v AS SELECT 1 AS x;
SELECT audit.track('v');
CREATE MATERIALIZED VIEW mv AS SELECT 1 AS x;
SELECT audit.track('mv');
CREATE SEQUENCE sq;
SELECT audit.track('sq');
SELECT audit.track('pg_class');
SELECT audit.track('audit.log');
CREATE TEMP TABLE tmp (id int);
SELECT audit.track('tmp');
SELECT audit.track(NULL);
SELECT audit.untrack(NULL);
SELECT count(*) AS tracked FROM audit.tracked_tables WHERE table_name = 't';
-- A caller who does not own the table.
CREATE ROLE audit_regress_nobody;
GRANT USAGE ON SCHEMA audit TO audit_regress_nobody;
GRANT EXECUTE ON FUNCTION audit.track(regclass, text[], text[], boolean, boolean, boolean, text) TO audit_regress_nobody;
SET ROLE audit_regress_nobody;
SELECT audit.track('t');
-- PUBLIC has no privilege on the log.
SELECT count(*) FROM audit.log;
RESET ROLE;
-- Settings refuse bad values at SET time.
SET audit.partition_interval = '30 minutes';
SET audit.partition_interval = 'soon';
SET audit.premake = -1;
SET audit.retention = 'forever';
SET audit.retention_mode = 'archive';
SET audit.context_settings = 'app.ok, bad name';
-- require_actor refuses writes without app.current_user, naming the setting.
SELECT audit.track('t');
SET audit.require_actor = on;
\set VERBOSITY default
INSERT INTO t VALUES (1, 'x');
\set VERBOSITY sqlstate
SELECT set_config('app.current_user', 'alice', false);
INSERT INTO t VALUES (1, 'x');
RESET audit.require_actor;
-- Malformed JSON in app.current_user is just a string and never fails a write.
SELECT set_config('app.current_user', '{"email": ', false);
INSERT INTO t VALUES (2, 'y');
SELECT changed_by FROM audit.log WHERE table_name = 't' ORDER BY id;
RESET "app.current_user";
-- Time travel refusals.
SELECT audit.state_at('t', '1', '2000-01-01');
SELECT audit.state_at('v', '1', now());
CREATE TABLE untracked (id int PRIMARY KEY);
SELECT audit.state_at('untracked', '1', now());
SELECT audit.state_at('t', NULL, now());
SELECT audit.undo(-5);
SELECT audit.undo(NULL);
SELECT * FROM audit.verify('{"block_id": 1}');
SELECT * FROM audit.verify('{"block_id": 1, "block_hash": "zz"}');
SELECT * FROM audit.verify('[1]');
DROP OWNED BY audit_regress_nobody;
DROP ROLE audit_regress_nobody;
