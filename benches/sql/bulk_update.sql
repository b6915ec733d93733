-- One UPDATE of every row, 2 columns (none, audit_ext, plpgsql).
-- Only the statements after \timing on are timed (the harness adds up psql's
-- "Time:" lines). psql variables: rows, batch, copy_file.
SET "app.current_user" = 'batch-job@example.com';   -- a batch job sets its actor
\timing on
UPDATE bench SET balance = balance + 1, updated_at = now();
