-- The security model: PUBLIC has no privilege in audit, a DML-only role still produces
-- audit rows, the trigger ignores the caller's search_path, and identity survives
-- SECURITY DEFINER wrappers.
CREATE ROLE audit_regress_app;
CREATE ROLE audit_regress_owner;
CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int);
SELECT audit.track('accounts');
GRANT SELECT, INSERT, UPDATE, DELETE ON accounts TO audit_regress_app;
-- A schema of the caller's holding objects named log, to_jsonb and now changes nothing.
CREATE SCHEMA evil;
GRANT USAGE, CREATE ON SCHEMA evil TO audit_regress_app;
CREATE TABLE evil.log (x int);
CREATE FUNCTION evil.to_jsonb(anyelement) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{"evil": true}'::jsonb $$;
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT '1999-01-01'::timestamptz $$;
GRANT ALL ON evil.log TO audit_regress_app;
SET ROLE audit_regress_app;
SET search_path = evil, public, pg_catalog;
INSERT INTO accounts VALUES (1, 'ann', 10);
UPDATE accounts SET balance = 20 WHERE id = 1;
COPY accounts FROM stdin;
2	bob	5
3	cy	7
\.
-- The app role cannot read, change or truncate the log.
\set VERBOSITY sqlstate
SELECT count(*) FROM audit.log;
UPDATE audit.log SET changed_by = 'x';
DELETE FROM audit.log;
TRUNCATE audit.log;
SELECT audit.verify();
-- ... nor switch require_actor off for itself.
SET audit.require_actor = off;
\set VERBOSITY default
RESET search_path;
RESET ROLE;
SELECT count(*) AS evil_rows FROM evil.log;
SELECT operation, row_id, new_values, changed_by, db_user, changed_at > '2000-01-01' AS real_now
  FROM audit.log WHERE table_name = 'accounts' ORDER BY id;
-- A SECURITY DEFINER wrapper does not turn the caller into its owner.
CREATE FUNCTION pay(i int) RETURNS void SECURITY DEFINER LANGUAGE sql AS $$ UPDATE public.accounts SET balance = balance + 1 WHERE id = i $$;
ALTER FUNCTION pay(int) OWNER TO audit_regress_owner;
GRANT ALL ON accounts TO audit_regress_owner;
SET SESSION AUTHORIZATION audit_regress_app;
SELECT pay(1);
RESET SESSION AUTHORIZATION;
SELECT changed_by, db_user FROM audit.log WHERE table_name = 'accounts' ORDER BY id DESC LIMIT 1;
-- Only a superuser can change audit data, and verify notices when one does (see chain.sql).
SELECT has_table_privilege('audit_regress_app', 'audit.log', 'SELECT') AS app_can_read,
       has_schema_privilege('audit_regress_app', 'audit', 'USAGE') AS app_has_usage,
       has_function_privilege('audit_regress_app', 'audit.seal()', 'EXECUTE') AS app_can_seal;
-- User code never runs as the extension owner. A table owner's enum with a cast to
-- json runs inside to_jsonb: in the trigger and in state_at it must run as the caller.
CREATE ROLE audit_regress_mallory;
CREATE SCHEMA mallory AUTHORIZATION audit_regress_mallory;
SET ROLE audit_regress_mallory;
CREATE TYPE mallory.feeling AS ENUM ('ok');
CREATE FUNCTION mallory.feeling_json(mallory.feeling) RETURNS json LANGUAGE sql
  AS $$ SELECT pg_catalog.json_build_object('ran_as', current_user::text) $$;
CREATE CAST (mallory.feeling AS json) WITH FUNCTION mallory.feeling_json(mallory.feeling);
CREATE TABLE mallory.moods (id int PRIMARY KEY, f mallory.feeling);
RESET ROLE;
SELECT audit.track('mallory.moods');
SET ROLE audit_regress_mallory;
INSERT INTO mallory.moods VALUES (1, 'ok');
RESET ROLE;
SELECT new_values FROM audit.log WHERE table_name = 'moods';
-- The time-travel readers need SELECT on the table itself; live rows are read as the caller.
CREATE ROLE audit_regress_auditor;
GRANT USAGE ON SCHEMA audit, mallory TO audit_regress_auditor;
GRANT EXECUTE ON FUNCTION audit.state_at(regclass, text, timestamptz), audit.table_at(regclass, timestamptz),
  audit.history(regclass, text) TO audit_regress_auditor;
SET ROLE audit_regress_auditor;
\set VERBOSITY sqlstate
SELECT audit.state_at('mallory.moods', '1', now());
SELECT count(*) FROM audit.table_at('mallory.moods', now());
SELECT count(*) FROM audit.history('mallory.moods', '1');
\set VERBOSITY default
RESET ROLE;
GRANT SELECT ON mallory.moods TO audit_regress_auditor;
SET ROLE audit_regress_auditor;
SELECT audit.state_at('mallory.moods', '1', now());
SELECT * FROM audit.table_at('mallory.moods', now());
SELECT operation, state FROM audit.history('mallory.moods', '1');
RESET ROLE;
DROP SCHEMA mallory CASCADE;
REVOKE ALL ON SCHEMA audit FROM audit_regress_auditor;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA audit FROM audit_regress_auditor;
DROP ROLE audit_regress_auditor;
DROP ROLE audit_regress_mallory;
DROP SCHEMA evil CASCADE;
DROP FUNCTION pay(int);
REVOKE ALL ON accounts FROM audit_regress_app, audit_regress_owner;
DROP ROLE audit_regress_app;
DROP ROLE audit_regress_owner;
-- audit.version() reads no superuser-only setting: a role granted it may call it.
CREATE ROLE audit_regress_ops;
GRANT USAGE ON SCHEMA audit TO audit_regress_ops;
GRANT EXECUTE ON FUNCTION audit.version() TO audit_regress_ops;
SET ROLE audit_regress_ops;
SELECT v->>'background_worker' AS preloaded,
       v->>'extension_version' = v->>'library_version' AS same_version
  FROM audit.version() AS v;
RESET ROLE;
REVOKE ALL ON FUNCTION audit.version() FROM audit_regress_ops;
REVOKE ALL ON SCHEMA audit FROM audit_regress_ops;
DROP ROLE audit_regress_ops;
