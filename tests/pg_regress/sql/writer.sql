-- The log writer: rows go straight into the current partition, once per
-- transaction it is opened and closed. Savepoints, errors, maintain() and a
-- DROP in the middle of a transaction must neither lose nor invent a row, nor
-- leave a relation reference behind (PostgreSQL would print a WARNING here).
CREATE EXTENSION IF NOT EXISTS audit_ext;
CREATE TABLE acct (id int PRIMARY KEY, v int);
SELECT audit.track('acct');

-- A savepoint rolled back: its row goes, the others stay.
BEGIN;
INSERT INTO acct VALUES (1, 0);
SAVEPOINT a;
INSERT INTO acct VALUES (2, 0);
ROLLBACK TO a;
INSERT INTO acct VALUES (3, 0);
COMMIT;
SELECT row_id, operation FROM audit.log WHERE table_name = 'acct' ORDER BY id;

-- The transaction's first audit row inside a savepoint that is rolled back:
-- the writer opened there must still serve the rest of the transaction.
BEGIN;
SAVEPOINT a;
UPDATE acct SET v = 1 WHERE id = 1;
ROLLBACK TO a;
UPDATE acct SET v = 2 WHERE id = 3;
SAVEPOINT b;
UPDATE acct SET v = 3 WHERE id = 3;
RELEASE b;
COMMIT;
SELECT row_id, operation, new_values->>'v' AS v FROM audit.log WHERE table_name = 'acct' AND operation = 'UPDATE' ORDER BY id;

-- An error inside the writer's subtransaction (a PL/pgSQL exception block),
-- then more rows in the same transaction.
DO $$
BEGIN
  INSERT INTO acct VALUES (10, 0);
  BEGIN
    INSERT INTO acct VALUES (11, 0);
    INSERT INTO acct VALUES (10, 0);  -- duplicate key: this block is rolled back
  EXCEPTION WHEN unique_violation THEN
    RAISE NOTICE 'block rolled back';
  END;
  INSERT INTO acct VALUES (12, 0);
END $$;
SELECT row_id FROM audit.log WHERE table_name = 'acct' AND operation = 'INSERT' AND row_id::int >= 10 ORDER BY id;

-- maintain() in the middle of a transaction that has written audit rows.
BEGIN;
INSERT INTO acct VALUES (20, 0);
SELECT (audit.maintain()) ? 'created' AS ran;
INSERT INTO acct VALUES (21, 0);
COMMIT;
SELECT count(*) FROM audit.log WHERE table_name = 'acct' AND row_id IN ('20', '21');

-- Rows never land in the default partition when a partition covers their time.
SELECT count(*) AS in_default FROM audit.log_default WHERE table_name = 'acct';

-- A statement's rows all land, with every index consistent.
INSERT INTO acct SELECT g, 0 FROM generate_series(100, 5099) g;
UPDATE acct SET v = v + 1 WHERE id >= 100;
SELECT count(*) FROM audit.log WHERE table_name = 'acct' AND row_id::int >= 100;
CREATE EXTENSION amcheck;
-- heapallindexed: every log row is in every btree of its partition.
SELECT count(*) > 0 AS checked FROM (
  SELECT bt_index_check(i.indexrelid, true) FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indrelid
    JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
   WHERE h.inhparent = 'audit.log'::regclass AND a.amname = 'btree') s;

-- A partition with a row trigger of its own: rows take the full INSERT, so the trigger fires.
CREATE FUNCTION note_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE NOTICE 'partition trigger saw %', NEW.row_id; RETURN NULL; END $$;
DO $$ BEGIN
  EXECUTE format('CREATE TRIGGER note AFTER INSERT ON %s FOR EACH ROW EXECUTE FUNCTION note_row()',
                 (SELECT tableoid::regclass FROM audit.log WHERE table_name = 'acct' ORDER BY id DESC LIMIT 1));
END $$;
INSERT INTO acct VALUES (30, 0);
BEGIN;
INSERT INTO acct VALUES (31, 0);
INSERT INTO acct VALUES (32, 0);
COMMIT;
DO $$ BEGIN
  EXECUTE format('DROP TRIGGER note ON %s', (SELECT tableoid::regclass FROM audit.log WHERE table_name = 'acct' ORDER BY id DESC LIMIT 1));
END $$;
SELECT count(*) FROM audit.log WHERE table_name = 'acct' AND row_id IN ('30', '31', '32');

-- Row-level security on the log: rows take the full INSERT too.
ALTER TABLE audit.log ENABLE ROW LEVEL SECURITY;
INSERT INTO acct VALUES (33, 0);
ALTER TABLE audit.log DISABLE ROW LEVEL SECURITY;
SELECT count(*) FROM audit.log WHERE table_name = 'acct' AND row_id = '33';

-- The chain covers rows written both ways.
SELECT (audit.seal()) > 0 AS sealed;
SELECT ok FROM audit.verify();

-- DROP EXTENSION after audit rows in the same transaction: the writer lets go first.
BEGIN;
INSERT INTO acct VALUES (40, 0);
SET LOCAL audit.allow_drop = on;
SET LOCAL client_min_messages = warning;
DROP EXTENSION audit_ext CASCADE;
ROLLBACK;
SELECT count(*) FROM audit.log WHERE table_name = 'acct' AND row_id = '40';

-- Maintenance of the log itself after audit rows in the same transaction: the
-- writer lets go of the log before each utility statement, so PostgreSQL does not
-- find it "in use by active queries in this session", and the rows written after
-- the statement are logged.
BEGIN;
INSERT INTO acct VALUES (50, 0);
CREATE INDEX acct_probe ON audit.log_default (changed_by);
INSERT INTO acct VALUES (51, 0);
DROP INDEX audit.acct_probe;
ALTER TABLE audit.log_default SET (fillfactor = 90);
INSERT INTO acct VALUES (52, 0);
SET LOCAL audit.allow_drop = on;
-- From inside a DO block too: the partition the rows just went to.
DO $$ BEGIN
  EXECUTE format('DROP TABLE %s', (SELECT tableoid::regclass FROM audit.log WHERE table_name = 'acct' ORDER BY id DESC LIMIT 1));
END $$;
INSERT INTO acct VALUES (53, 0);
SELECT row_id, tableoid::regclass AS part FROM audit.log WHERE table_name = 'acct' AND row_id::int BETWEEN 50 AND 59 ORDER BY id;
TRUNCATE audit.log;
INSERT INTO acct VALUES (54, 0);
SELECT row_id FROM audit.log ORDER BY id;
ROLLBACK;
SELECT count(*) FROM audit.log WHERE table_name = 'acct' AND row_id::int BETWEEN 50 AND 59;
