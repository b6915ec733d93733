-- Floor: COPY cannot feed a data-modifying CTE, so the hand-written version is
-- the same COPY plus one INSERT ... SELECT of the log rows (by key range) in the
-- same transaction. BEGIN and COMMIT are timed too (the other variants' COPY
-- commits inside its own timing).
-- Only the statements after \timing on are timed (the harness adds up psql's
-- "Time:" lines). psql variables: rows, batch, copy_file.
SET "app.current_user" = 'batch-job@example.com';   -- a batch job sets its actor
\timing on
BEGIN;
COPY bench FROM :'copy_file';
INSERT INTO audit.audit_log (table_name, operation, row_id, old_values, new_values, changed_by, session_info)
SELECT 'bench', 'INSERT', b.id::text, NULL, to_jsonb(b),
       coalesce(nullif(current_setting('app.current_user', true), ''), session_user),
       jsonb_build_object('client_addr', inet_client_addr(),
                          'client_port', inet_client_port(),
                          'backend_pid', pg_backend_pid(),
                          'application_name', current_setting('application_name', true))
  FROM bench b
 WHERE b.id > :rows;
COMMIT;
