-- state_at, table_at, history and undo, across the moment tracking began.
CREATE TABLE customers (id int PRIMARY KEY, email text, name text, secret text, notes text NOT NULL DEFAULT '');
INSERT INTO customers VALUES (1, 'ann@x', 'Ann', 's1', 'pre'), (2, 'bob@x', 'Bob', 's2', 'pre'), (3, 'cy@x', 'Cy', 's3', 'pre');
SELECT audit.track('customers', exclude => '{notes}', redact => '{secret}');
CREATE TEMP TABLE marks (name text PRIMARY KEY, at timestamptz);
-- Each step is its own transaction, so each has its own now().
INSERT INTO marks VALUES ('t0', clock_timestamp());
SELECT pg_sleep(0.01);
BEGIN;
SELECT set_config('app.current_user', 'batch_script@system', true);
UPDATE customers SET email = 'evil@x' WHERE id = 1;
DELETE FROM customers WHERE id = 2;
INSERT INTO customers VALUES (4, 'dee@x', 'Dee', 's4', 'new');
COMMIT;
SELECT pg_sleep(0.01);
INSERT INTO marks VALUES ('t1', clock_timestamp());
SELECT pg_sleep(0.01);
UPDATE customers SET id = 30 WHERE id = 3;
SELECT pg_sleep(0.01);
INSERT INTO marks VALUES ('t2', clock_timestamp());

-- A row that existed before tracking and never changed: its live state.
SELECT audit.state_at('customers', '3', (SELECT at FROM marks WHERE name = 't0')) - 'secret' AS cy_t0;
SELECT audit.state_at('customers', '1', (SELECT at FROM marks WHERE name = 't0')) - 'secret' AS ann_t0;
SELECT audit.state_at('customers', '1', (SELECT at FROM marks WHERE name = 't1')) - 'secret' AS ann_t1;
SELECT audit.state_at('customers', '2', (SELECT at FROM marks WHERE name = 't0')) - 'secret' AS bob_t0;
SELECT audit.state_at('customers', '2', (SELECT at FROM marks WHERE name = 't1')) AS bob_t1;
SELECT audit.state_at('customers', '4', (SELECT at FROM marks WHERE name = 't0')) AS dee_t0;
-- Key changes: the old key existed until the change, the new one only after.
SELECT audit.state_at('customers', '3', (SELECT at FROM marks WHERE name = 't1')) - 'secret' AS cy_as_3_t1;
SELECT audit.state_at('customers', '30', (SELECT at FROM marks WHERE name = 't1')) AS cy_as_30_t1;
SELECT audit.state_at('customers', '30', (SELECT at FROM marks WHERE name = 't2')) - 'secret' AS cy_as_30_t2;
-- Redacted columns come back as markers, excluded ones not at all.
SELECT audit.state_at('customers', '1', now())->>'secret' ~ '^redacted:' AS marker,
       audit.state_at('customers', '1', now()) ? 'notes' AS has_notes;

SELECT j - 'secret' AS row_at_t0 FROM audit.table_at('customers', (SELECT at FROM marks WHERE name = 't0')) j ORDER BY j->>'id';
SELECT j - 'secret' AS row_at_t1 FROM audit.table_at('customers', (SELECT at FROM marks WHERE name = 't1')) j ORDER BY j->>'id';
-- Typed rows.
SELECT r.id, r.email FROM audit.table_at('customers', (SELECT at FROM marks WHERE name = 't0')) j,
       jsonb_populate_record(NULL::customers, j) r ORDER BY r.id;

SELECT operation, changed_by, changed_fields, old_values - 'secret' AS old_values, state - 'secret' AS state
  FROM audit.history('customers', '1');
SELECT operation, state FROM audit.history('customers', '2');

-- Undo the batch transaction: refused while a later change touches its rows, unless forced.
SELECT txid AS batch FROM audit.log WHERE changed_by = 'batch_script@system' AND table_name = 'customers' LIMIT 1 \gset
UPDATE customers SET name = 'Ann B' WHERE id = 1;
\set VERBOSITY sqlstate
SELECT audit.undo(:batch);
\set VERBOSITY default
-- The refused undo changed nothing.
SELECT id, email, name FROM customers ORDER BY id;
-- Bob's secret is redacted and NOT NULL? No: nullable, so it comes back NULL; notes has a default.
SELECT audit.undo(:batch, force => true) AS restored;
SELECT id, email, name, secret IS NULL AS secret_lost, notes FROM customers ORDER BY id;
-- The undo is audited like any other change.
SELECT operation, row_id FROM audit.log WHERE table_name = 'customers' ORDER BY id DESC LIMIT 3;

-- Refusals: a redacted NOT NULL column cannot be restored by re-insert.
CREATE TABLE vault (id int PRIMARY KEY, pin text NOT NULL);
SELECT audit.track('vault', redact => '{pin}');
INSERT INTO vault VALUES (1, '1234');
DELETE FROM vault WHERE id = 1;
SELECT txid AS del FROM audit.log WHERE table_name = 'vault' AND operation = 'DELETE' \gset
SELECT audit.undo(:del);
-- Foreign keys: undoing a parent+child insert deletes the child first.
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent);
SELECT audit.track('parent'); SELECT audit.track('child');
BEGIN; INSERT INTO parent VALUES (1); INSERT INTO child VALUES (10, 1); COMMIT;
SELECT txid AS fk FROM audit.log WHERE table_name = 'child' \gset
SELECT audit.undo(:fk) AS restored;
SELECT (SELECT count(*) FROM parent) AS parents, (SELECT count(*) FROM child) AS children;
-- ... and undoing their deletion inserts the parent first.
INSERT INTO parent VALUES (2); INSERT INTO child VALUES (20, 2);
BEGIN; DELETE FROM child; DELETE FROM parent; COMMIT;
SELECT txid AS fkdel FROM audit.log WHERE table_name = 'parent' ORDER BY id DESC LIMIT 1 \gset
SELECT audit.undo(:fkdel) AS restored;
SELECT (SELECT count(*) FROM parent) AS parents, (SELECT count(*) FROM child) AS children;
