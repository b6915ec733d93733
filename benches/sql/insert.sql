-- INSERT ... SELECT of :batch new rows (none, audit_ext, plpgsql).
-- Only the statements after \timing on are timed (the harness adds up psql's
-- "Time:" lines). psql variables: rows, batch, copy_file.
SET "app.current_user" = 'batch-job@example.com';   -- a batch job sets its actor
\timing on
INSERT INTO bench SELECT * FROM bench_new;
