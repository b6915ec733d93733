-- Floor: the same UPDATE of every row plus one log row per row, by one
-- statement. PostgreSQL 15 has no OLD in RETURNING, so the old row comes from a
-- self-join (the cheapest way to get it without a trigger).
-- Only the statements after \timing on are timed (the harness adds up psql's
-- "Time:" lines). psql variables: rows, batch, copy_file.
SET "app.current_user" = 'batch-job@example.com';   -- a batch job sets its actor
\timing on
WITH u AS (
  UPDATE bench b SET balance = b.balance + 1, updated_at = now()
    FROM bench o
   WHERE o.id = b.id
  RETURNING b.id, to_jsonb(o) AS old_values, to_jsonb(b) AS new_values)
INSERT INTO audit.audit_log (table_name, operation, row_id, old_values, new_values, changed_by, session_info)
SELECT 'bench', 'UPDATE', u.id::text, u.old_values, u.new_values,
       coalesce(nullif(current_setting('app.current_user', true), ''), session_user),
       jsonb_build_object('client_addr', inet_client_addr(),
                          'client_port', inet_client_port(),
                          'backend_pid', pg_backend_pid(),
                          'application_name', current_setting('application_name', true))
  FROM u;
