-- The capture contract: one audit row per change, with the documented columns.
CREATE EXTENSION audit_ext;
CREATE TABLE users (id int PRIMARY KEY, email text, name text, pw text, updated_at timestamptz, score numeric);
INSERT INTO users VALUES (1, 'a@x.com', 'Ann', 's1', now(), 1.50);
SELECT audit.track('users', exclude => '{updated_at}', redact => '{pw}');
SELECT tbl, schema_name, table_name, exclude, redact FROM audit.tracked_tables;

INSERT INTO users VALUES (2, 'b@x.com', 'Bob', 'hunter2', now(), 'NaN');
BEGIN;
SELECT set_config('app.current_user', '{"user_id": 7, "email": "ops@corp"}', true);
UPDATE users SET email = 'new@x.com' WHERE id = 1;
COMMIT;
-- Only an excluded column changed: no row.
UPDATE users SET updated_at = now() WHERE id = 1;
-- No column changed at all: no row.
UPDATE users SET email = email WHERE id = 1;
SET "app.current_user" = 'batch_script@system';
UPDATE users SET pw = 'x' WHERE id = 2;
DELETE FROM users WHERE id = 2;
RESET "app.current_user";
TRUNCATE users;

SELECT id, operation, row_id, old_values - 'pw' AS old_values, new_values - 'pw' AS new_values,
       changed_fields, changed_by, db_user, schema_name, table_name,
       session_info - 'backend_pid' AS session_info, length(row_hash) AS hash_len
  FROM audit.log ORDER BY id;

-- Redaction: markers, never the plaintext; equal values give equal markers.
SELECT id, new_values->>'pw' ~ '^redacted:[0-9a-f]{64}$' AS marker,
       position('hunter2' in new_values::text) = 0 AS no_plaintext
  FROM audit.log WHERE new_values ? 'pw' ORDER BY id;
SELECT (SELECT new_values->>'pw' FROM audit.log WHERE id = 1) = (SELECT old_values->>'pw' FROM audit.log WHERE id = 3) AS same_marker;
-- Excluded columns never appear.
SELECT count(*) AS rows_mentioning_excluded FROM audit.log WHERE new_values ? 'updated_at' OR old_values ? 'updated_at';
-- The whole previous row of an UPDATE is new_values || old_values.
SELECT (new_values || old_values)->>'email' AS previous_email FROM audit.log WHERE id = 2;

-- Rollback and savepoint rollback leave nothing.
SELECT count(*) AS before FROM audit.log;
BEGIN; INSERT INTO users VALUES (10, 'r', 'r', 'r', now(), 0); ROLLBACK;
BEGIN; INSERT INTO users VALUES (11, 'k', 'k', 'k', now(), 0);
SAVEPOINT s; INSERT INTO users VALUES (12, 'r', 'r', 'r', now(), 0); ROLLBACK TO s;
COMMIT;
SELECT row_id FROM audit.log WHERE id > 5 ORDER BY id;

-- Composite keys, quoted mixed-case names, a schema, and no primary key.
CREATE SCHEMA "Sales";
CREATE TABLE "Sales"."Order Lines" ("Order" int, region text, qty int, PRIMARY KEY ("Order", region));
SELECT audit.track('"Sales"."Order Lines"');
INSERT INTO "Sales"."Order Lines" VALUES (7, 'eu,west', 1);
UPDATE "Sales"."Order Lines" SET qty = 2;
SELECT schema_name, table_name, operation, row_id, old_values, changed_fields
  FROM audit.log WHERE schema_name = 'Sales' ORDER BY id;
CREATE TABLE nokey (a int, b text);
SELECT audit.track('nokey');
INSERT INTO nokey VALUES (1, 'x');
SELECT operation, row_id, new_values FROM audit.log WHERE table_name = 'nokey';
-- A key change keeps the old key next to the new one.
UPDATE users SET id = 111 WHERE id = 11;
SELECT row_id, old_row_id, old_values FROM audit.log WHERE table_name = 'users' ORDER BY id DESC LIMIT 1;

-- Partitioned tables: the parent's name is recorded, partitions made later included.
CREATE TABLE events (id int, day date, what text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
SELECT audit.track('events');
CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
INSERT INTO events VALUES (1, '2026-01-05', 'a'), (2, '2026-02-05', 'b');
SELECT table_name, row_id, new_values->>'what' AS what FROM audit.log WHERE table_name LIKE 'events%' ORDER BY id;
-- A partition of a tracked parent cannot be tracked on its own.
SELECT audit.track('events_2');

-- Columns added and dropped after tracking began.
ALTER TABLE users ADD COLUMN phone text;
UPDATE users SET phone = '555' WHERE id = 111;
ALTER TABLE users DROP COLUMN score;
UPDATE users SET name = 'Kim' WHERE id = 111;
SELECT changed_fields, new_values - 'pw' AS new_values FROM audit.log WHERE table_name = 'users' AND operation <> 'DDL' ORDER BY id DESC LIMIT 2;

-- Idempotent track replaces the options; untrack keeps history and stops capture.
SELECT audit.track('users', exclude => '{phone}');
SELECT audit.track('users', exclude => '{phone}');
SELECT exclude, redact FROM audit.tracked_tables WHERE table_name = 'users';
SELECT audit.untrack('users');
SELECT audit.untrack('users');
INSERT INTO users (id) VALUES (500);
SELECT count(*) AS rows_for_500 FROM audit.log WHERE row_id = '500';
SELECT count(*) > 0 AS history_kept FROM audit.log WHERE table_name = 'users';
