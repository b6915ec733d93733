-- Numbers are exact through every function: the log, state_at, table_at, history
-- and undo (which writes them back). None of them may pass a value through a
-- binary float. Edges: 1000 digits, NaN, +-Infinity (PostgreSQL 14+), -0,
-- trailing zeros, scale 0 and negative scale (PostgreSQL 15+).
CREATE TABLE amounts (id int PRIMARY KEY, amt numeric, big numeric, price numeric(10,2),
                      neg numeric(5,-3), f8 float8, j jsonb);
SELECT audit.track('amounts');
CREATE TEMP TABLE num_marks (name text PRIMARY KEY, at timestamptz);
INSERT INTO amounts VALUES
  (1, 0.1234567890123456789, 123456789012345678901234567890, 1.50, 12345678, 0.1, '{"n": 0.1234567890123456789}'),
  (2, 'NaN', -98765432109876543210.000000000000000001, 0.00, -1000, 'NaN', '[1.10, 100000000000000000001]'),
  (3, 'Infinity', '-Infinity', 10, 0, '-Infinity', '{"n": 1e-20}'),
  (4, -0.0, 0, -0.50, 500, -0.0, '{"n": 1.000}'),
  (5, ('0.' || repeat('9', 600) || repeat('1', 400))::numeric, 1e-300, 9999999.99, 12000, 1e308, NULL);
INSERT INTO num_marks VALUES ('t0', clock_timestamp());
SELECT pg_sleep(0.01);
BEGIN;
UPDATE amounts SET amt = amt + 1, big = big * 10, price = price + 0.01, neg = neg + 1000, f8 = f8 / 2,
                   j = jsonb_build_object('n', 2.50) WHERE id IN (1, 2, 3, 4, 5);
SELECT txid_current() AS upd \gset
COMMIT;
SELECT pg_sleep(0.01);
-- state_at before the update: every value exactly as inserted.
SELECT id, audit.state_at('amounts', id::text, (SELECT at FROM num_marks WHERE name = 't0'))::text AS state
  FROM amounts WHERE id < 5 ORDER BY id;
SELECT length(audit.state_at('amounts', '5', (SELECT at FROM num_marks WHERE name = 't0'))->>'amt') AS digits,
       (audit.state_at('amounts', '5', (SELECT at FROM num_marks WHERE name = 't0'))->>'amt')::numeric
         = ('0.' || repeat('9', 600) || repeat('1', 400))::numeric AS exact_1000_digits;
-- table_at agrees, value for value.
SELECT count(*) FILTER (WHERE s = audit.state_at('amounts', s->>'id', (SELECT at FROM num_marks WHERE name = 't0'))) AS equal,
       count(*) AS total
  FROM audit.table_at('amounts', (SELECT at FROM num_marks WHERE name = 't0')) AS s;
-- history shows the same numbers.
SELECT operation, old_values->>'amt' AS old_amt, new_values->>'amt' AS new_amt, state->>'big' AS big, state->>'price' AS price
  FROM audit.history('amounts', '1') ORDER BY id;
-- undo writes the exact values back.
CREATE TEMP TABLE before_undo AS SELECT * FROM amounts;
SELECT audit.undo(:upd) AS restored;
SELECT id, amt::text, big::text, price::text, neg::text, f8::text, j::text FROM amounts WHERE id < 5 ORDER BY id;
SELECT amt = ('0.' || repeat('9', 600) || repeat('1', 400))::numeric AS exact_after_undo
  FROM amounts WHERE id = 5;
-- After the undo, every row is again exactly what the INSERT logged, as text too.
SELECT count(*) FILTER (WHERE l.new_values = to_jsonb(a) AND l.new_values::text = to_jsonb(a)::text) AS same,
       count(*) AS total
  FROM audit.log l JOIN amounts a ON l.row_id = a.id::text
 WHERE l.table_name = 'amounts' AND l.operation = 'INSERT';
SELECT ok FROM audit.verify();
