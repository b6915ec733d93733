-- Capture cannot be stopped quietly: renaming or replacing a capture trigger is
-- refused (whatever it is called), and enabling or disabling it, on the tracked
-- table or on any of its partitions, leaves a DDL row.
CREATE TABLE ct (id int PRIMARY KEY, v text);
SELECT audit.track('ct');
CREATE FUNCTION ct_noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
\set VERBOSITY sqlstate
ALTER TRIGGER audit_capture_row ON ct RENAME TO harmless;
ALTER TRIGGER audit_capture_truncate ON ct RENAME TO harmless;
CREATE OR REPLACE TRIGGER audit_capture_row AFTER INSERT OR UPDATE OR DELETE ON ct
  FOR EACH ROW EXECUTE FUNCTION ct_noop();
CREATE OR REPLACE TRIGGER audit_capture_row AFTER INSERT ON ct
  FOR EACH ROW EXECUTE FUNCTION audit.capture();
CREATE OR REPLACE TRIGGER audit_capture_row AFTER INSERT OR UPDATE OR DELETE ON ct
  FOR EACH ROW WHEN (false) EXECUTE FUNCTION audit.capture();
CREATE TRIGGER second_capture AFTER INSERT OR UPDATE OR DELETE ON ct
  FOR EACH ROW EXECUTE FUNCTION audit.capture();
CREATE TABLE ct_other (id int);
CREATE TRIGGER audit_capture_row AFTER INSERT ON ct_other FOR EACH ROW EXECUTE FUNCTION ct_noop();
\set VERBOSITY default
-- The refusal names the trigger and says how capture is changed.
ALTER TRIGGER audit_capture_row ON ct RENAME TO harmless;
-- The triggers are as audit.track() made them, and capture goes on.
SELECT tgname, tgenabled, tgfoid::regprocedure FROM pg_trigger WHERE tgrelid = 'ct'::regclass ORDER BY 1;
INSERT INTO ct VALUES (1, 'a');
SELECT operation, row_id FROM audit.log WHERE table_name = 'ct' ORDER BY id;
-- Re-running track keeps working (it makes exactly the shape it allows).
SELECT audit.track('ct');
-- DISABLE/ENABLE on the table leaves DDL rows.
ALTER TABLE ct DISABLE TRIGGER audit_capture_row;
ALTER TABLE ct ENABLE TRIGGER audit_capture_row;
-- On a partition of a tracked partitioned table, too: recorded under the tracked table.
CREATE TABLE ctp (id int, k int, PRIMARY KEY (id, k)) PARTITION BY LIST (k);
CREATE TABLE ctp_1 PARTITION OF ctp FOR VALUES IN (1);
CREATE TABLE ctp_2 PARTITION OF ctp FOR VALUES IN (2);
SELECT audit.track('ctp');
ALTER TABLE ctp_2 DISABLE TRIGGER audit_capture_row;
INSERT INTO ctp VALUES (1, 2);
ALTER TABLE ctp_2 ENABLE ALWAYS TRIGGER audit_capture_row;
-- A partition's clone cannot be renamed either (PostgreSQL refuses it itself, with a
-- SQLSTATE that differs between versions).
DO $$
BEGIN
  ALTER TRIGGER audit_capture_row ON ctp_2 RENAME TO harmless;
  RAISE NOTICE 'renamed';
EXCEPTION WHEN OTHERS THEN
  RAISE NOTICE 'refused';
END $$;
SELECT table_name, new_values->>'object_identity' AS object, new_values->>'statement' AS statement
  FROM audit.log WHERE operation = 'DDL' AND table_name IN ('ct', 'ctp') ORDER BY id;
-- untrack still removes them, and says so.
SELECT audit.untrack('ct');
SELECT count(*) AS capture_triggers_left FROM pg_trigger WHERE tgrelid = 'ct'::regclass;
SELECT new_values->>'command_tag' AS tag FROM audit.log WHERE table_name = 'ct' ORDER BY id DESC LIMIT 1;
