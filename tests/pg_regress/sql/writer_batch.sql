-- A statement's audit rows are written in batches of multi-inserts
-- (src/log/batch.rs), and nothing SQL can see changes: each later statement
-- sees them all, a savepoint rolled back leaves none of its rows, COPY FROM is
-- captured whole, and a trigger of the user's sees the audit rows of the rows
-- before it, as when every row was written at once. (Last in name order: it
-- adds rows the earlier files do not expect.)
CREATE EXTENSION IF NOT EXISTS audit_ext;
CREATE TABLE wb (id int PRIMARY KEY, v int NOT NULL);
SELECT audit.track('wb');
INSERT INTO wb SELECT g, 0 FROM generate_series(1, 2500) g;
SELECT count(*) FROM audit.log WHERE table_name = 'wb';

BEGIN;
UPDATE wb SET v = v + 1;
SELECT count(*) FROM audit.log WHERE table_name = 'wb' AND operation = 'UPDATE';
SAVEPOINT s;
UPDATE wb SET v = v + 1;
SELECT count(*) FROM audit.log WHERE table_name = 'wb' AND operation = 'UPDATE';
ROLLBACK TO s;
SELECT count(*) FROM audit.log WHERE table_name = 'wb' AND operation = 'UPDATE';
COMMIT;
SELECT count(*), count(DISTINCT txid) FROM audit.log WHERE table_name = 'wb' AND operation = 'UPDATE';

-- One query string, two statements: the second sees the first's rows.
UPDATE wb SET v = v + 1 WHERE id <= 1500; SELECT count(*) FROM audit.log WHERE table_name = 'wb' AND operation = 'UPDATE';

COPY wb (id, v) FROM STDIN;
2501	0
2502	0
2503	0
\.
SELECT row_id, operation FROM audit.log WHERE table_name = 'wb' AND row_id::int > 2500 ORDER BY id;

-- A trigger of the user's: the statement's audit rows are written one by one,
-- so at its k-th row the trigger (after audit_capture_row, in name order) sees k.
CREATE TABLE wb_seen (n serial, logged bigint);
CREATE FUNCTION wb_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO wb_seen (logged) SELECT count(*) FROM audit.log WHERE table_name = 'wb';
  RETURN NULL;
END $$;
CREATE TRIGGER zz_count AFTER UPDATE ON wb FOR EACH ROW EXECUTE FUNCTION wb_count();
UPDATE wb SET v = v + 1 WHERE id <= 5;
SELECT n, logged - 2500 - 2500 - 1500 - 3 AS seen_of_this_statement FROM wb_seen ORDER BY n;
DROP TRIGGER zz_count ON wb;

SELECT audit.seal() > 0 AS sealed;
SELECT ok FROM audit.verify();
