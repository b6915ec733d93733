-- Floor: the same INSERT ... SELECT plus one log row per row, by one statement.
-- Only the statements after \timing on are timed (the harness adds up psql's
-- "Time:" lines). psql variables: rows, batch, copy_file.
SET "app.current_user" = 'batch-job@example.com';   -- a batch job sets its actor
\timing on
WITH i AS (INSERT INTO bench SELECT * FROM bench_new RETURNING *)
INSERT INTO audit.audit_log (table_name, operation, row_id, old_values, new_values, changed_by, session_info)
SELECT 'bench', 'INSERT', i.id::text, NULL, to_jsonb(i),
       coalesce(nullif(current_setting('app.current_user', true), ''), session_user),
       jsonb_build_object('client_addr', inet_client_addr(),
                          'client_port', inet_client_port(),
                          'backend_pid', pg_backend_pid(),
                          'application_name', current_setting('application_name', true))
  FROM i;
