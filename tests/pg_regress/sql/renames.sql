-- A table's history follows it through renames of the table and of its schema, in
-- both directions: new rows carry the new name at once (also in a session that
-- cached the old one), and state_at, table_at, history and undo find the rows
-- logged under every earlier name.
CREATE SCHEMA rn_s1;
CREATE TABLE rn_s1.rn (id int PRIMARY KEY, v text);
SELECT audit.track('rn_s1.rn');
INSERT INTO rn_s1.rn VALUES (1, 'first'), (2, 'two');
CREATE TEMP TABLE rn_marks (name text PRIMARY KEY, at timestamptz);
INSERT INTO rn_marks VALUES ('t0', clock_timestamp());
SELECT pg_sleep(0.01);
ALTER SCHEMA rn_s1 RENAME TO rn_s2;
UPDATE rn_s2.rn SET v = 'second' WHERE id = 1;
SELECT pg_sleep(0.01);
INSERT INTO rn_marks VALUES ('t1', clock_timestamp());
SELECT pg_sleep(0.01);
ALTER TABLE rn_s2.rn RENAME TO rn2;
BEGIN;
UPDATE rn_s2.rn2 SET v = 'third' WHERE id = 1;
DELETE FROM rn_s2.rn2 WHERE id = 2;
SELECT txid_current() AS rn_del \gset
COMMIT;
SELECT pg_sleep(0.01);
INSERT INTO rn_marks VALUES ('t2', clock_timestamp());
SELECT pg_sleep(0.01);
-- and back again
ALTER TABLE rn_s2.rn2 SET SCHEMA public;
ALTER TABLE public.rn2 RENAME TO rn;
UPDATE public.rn SET v = 'fourth' WHERE id = 1;
-- New rows carried each name as it was.
SELECT schema_name, table_name, operation, row_id, new_values->>'v' AS v
  FROM audit.log WHERE table_name IN ('rn', 'rn2') AND operation <> 'DDL' ORDER BY id;
SELECT schema_name, table_name FROM audit.table_names WHERE relid = 'public.rn'::regclass ORDER BY valid_from;
-- Every earlier state, under the current name.
SELECT audit.state_at('public.rn', '1', (SELECT at FROM rn_marks WHERE name = 't0'))->>'v' AS at_t0,
       audit.state_at('public.rn', '1', (SELECT at FROM rn_marks WHERE name = 't1'))->>'v' AS at_t1,
       audit.state_at('public.rn', '1', (SELECT at FROM rn_marks WHERE name = 't2'))->>'v' AS at_t2,
       audit.state_at('public.rn', '1', now())->>'v' AS now,
       audit.state_at('public.rn', '2', (SELECT at FROM rn_marks WHERE name = 't1'))->>'v' AS two_at_t1;
SELECT s->>'id' AS id, s->>'v' AS v FROM audit.table_at('public.rn', (SELECT at FROM rn_marks WHERE name = 't0')) s ORDER BY 1;
SELECT operation, new_values->>'v' AS v, old_values->>'v' AS old_v FROM audit.history('public.rn', '1') ORDER BY id;
-- undo of a transaction logged under an earlier name.
SELECT audit.undo(:rn_del, force => true) AS restored;
SELECT id, v FROM public.rn ORDER BY id;
-- A new table that takes an old name does not inherit the old table's history.
ALTER TABLE public.rn RENAME TO rn_old;
CREATE TABLE public.rn (id int PRIMARY KEY, v text);
SELECT audit.track('public.rn');
SELECT count(*) AS new_table_history FROM audit.history('public.rn', '1');
SELECT count(*) AS old_table_history FROM audit.history('public.rn_old', '1');
