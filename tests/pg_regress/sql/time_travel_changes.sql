-- capture => 'changes': an UPDATE stores only its changed columns. The same
-- timeline runs on three tables in the same transactions: tf ('full'), tc
-- ('changes'), tm (switched from 'full' to 'changes' and back mid-history) and
-- tz ('changes' with audit.image_every = 0: no whole image by chance, so every
-- walk goes to a whole change or the live row), and every answer of state_at,
-- table_at, history, undo and verify is compared.
CREATE TABLE tf (id int PRIMARY KEY, a numeric, b text, c jsonb, d int);
CREATE TABLE tc (LIKE tf INCLUDING ALL);
CREATE TABLE tm (LIKE tf INCLUDING ALL);
CREATE TABLE tz (LIKE tf INCLUDING ALL);
-- Rows older than tracking, recorded by a baseline.
INSERT INTO tf VALUES (1, 1.50, 'pre', '{"k": 1}', 1), (2, 0.10000000000000000001, 'été', NULL, 2);
INSERT INTO tc SELECT * FROM tf;
INSERT INTO tm SELECT * FROM tf;
INSERT INTO tz SELECT * FROM tf;
SELECT audit.track('tf', baseline => true);
SELECT audit.track('tc', baseline => true, capture => 'changes');
SELECT audit.track('tm', baseline => true, capture => 'full');
SELECT audit.track('tz', baseline => true, capture => 'changes');
SELECT table_name, capture FROM audit.tracked_tables WHERE table_name IN ('tf', 'tc', 'tm') ORDER BY 1;
SELECT audit.track('tc', capture => 'some');
SELECT audit.track('tc', capture => NULL);

CREATE TEMP TABLE marks (step int PRIMARY KEY, at timestamptz, txid bigint);
-- One step: the same statement on the three tables, in one transaction.
CREATE PROCEDURE timeline(steps int) LANGUAGE plpgsql AS $$
DECLARE
  r float8;
  k int;
  stmt text;
  t text;
  vals text[] := ARRAY['1.50', '0.10000000000000000001', '12345678901234567890.123456789', '-0.000', '1e-20', 'NaN'];
BEGIN
  PERFORM setseed(0.42);
  FOR i IN 1..steps LOOP
    IF i = 60 THEN PERFORM audit.track('tm', capture => 'changes'); END IF;
    IF i = 100 THEN PERFORM audit.track('tm', capture => 'full'); END IF;
    r := random();
    k := 1 + floor(random() * 4)::int;
    stmt := CASE
      WHEN r < 0.30 THEN format('UPDATE %%I SET a = %L::numeric WHERE id = %s', vals[1 + floor(random() * 6)::int], k)
      WHEN r < 0.50 THEN format('UPDATE %%I SET b = %L, c = %L WHERE id = %s',
                                'ü€😀 ' || i, jsonb_build_object('n', i, 'x', vals[1 + i % 6]::numeric), k)
      WHEN r < 0.60 THEN format('UPDATE %%I SET a = a, b = b WHERE id = %s', k)   -- nothing changes
      WHEN r < 0.70 THEN format('UPDATE %%I SET a = %s, b = %L, c = NULL, d = %s WHERE id = %s', i, 'all ' || i, i, k)
      WHEN r < 0.78 THEN format('DELETE FROM %%I WHERE id = %s', k)
      WHEN r < 0.88 THEN format('INSERT INTO %%I VALUES (%s, %s, %L, NULL, %s) ON CONFLICT (id) DO UPDATE SET d = EXCLUDED.d', k, i, 'new ' || i, i)
      WHEN r < 0.94 THEN format('UPDATE %%I SET id = %s WHERE id = %s AND NOT EXISTS (SELECT FROM %%I WHERE id = %s)', k + 4, k, k + 4)
      ELSE format('UPDATE %%I SET id = %s WHERE id = %s AND NOT EXISTS (SELECT FROM %%I WHERE id = %s)', k, k + 4, k)
    END;
    FOREACH t IN ARRAY ARRAY['tf', 'tc', 'tm', 'tz'] LOOP
      PERFORM set_config('audit.image_every', CASE t WHEN 'tz' THEN '0' ELSE '16' END, true);
      EXECUTE format(stmt, t, t);
    END LOOP;
    INSERT INTO marks VALUES (i, clock_timestamp(), txid_current());
    COMMIT;
  END LOOP;
END $$;
CALL timeline(160);

-- What was written: every 'changes' UPDATE holds its changed columns only, or
-- (about one in 16, and on a key move) the whole row.
SELECT count(*) > 0 AS some_updates,
       bool_and(new_values - changed_fields = '{}' OR new_values ?& ARRAY['id', 'a', 'b', 'c', 'd']) AS only_changed_or_whole,
       count(*) FILTER (WHERE new_values - changed_fields = '{}') > count(*) / 2 AS mostly_changed_only
  FROM audit.log WHERE table_name = 'tc' AND operation = 'UPDATE';
SELECT bool_and(new_values ?& ARRAY['id', 'a', 'b', 'c', 'd']) AS full_rows_whole
  FROM audit.log WHERE table_name = 'tf' AND operation = 'UPDATE';
-- Both modes store the same old values and changed fields, row for row.
SELECT count(*) AS rows_compared,
       count(*) FILTER (WHERE f.old_values::text IS DISTINCT FROM c.old_values::text
                           OR f.changed_fields IS DISTINCT FROM c.changed_fields
                           OR f.operation IS DISTINCT FROM c.operation
                           OR f.row_id IS DISTINCT FROM c.row_id) AS differing
  FROM (SELECT *, row_number() OVER (ORDER BY id) n FROM audit.log WHERE table_name = 'tf') f
  FULL JOIN (SELECT *, row_number() OVER (ORDER BY id) n FROM audit.log WHERE table_name = 'tc') c USING (n);

-- state_at: every key (including moved ones), at every step and between steps.
CREATE TEMP TABLE answers AS
SELECT m.step, k::text AS k, x.at,
       audit.state_at('tf', k::text, x.at)::text AS f,
       audit.state_at('tc', k::text, x.at)::text AS c,
       audit.state_at('tm', k::text, x.at)::text AS m,
       audit.state_at('tz', k::text, x.at)::text AS z
  FROM marks m, generate_series(1, 8) k,
       LATERAL (VALUES (m.at), (m.at - interval '1 microsecond')) AS x(at);
SELECT count(*) AS state_at_answers,
       count(*) FILTER (WHERE f IS NOT NULL) > 100 AS many_rows_existing,
       count(*) FILTER (WHERE f IS DISTINCT FROM c OR f IS DISTINCT FROM m OR f IS DISTINCT FROM z) AS differing
  FROM answers;
-- Values come back exactly, digits, scale and bytes.
SELECT DISTINCT (c::jsonb -> 'a')::text AS a_values FROM answers
 WHERE c::jsonb ->> 'a' IN ('1.50', '0.10000000000000000001', '12345678901234567890.123456789', '-0.000',
                            '0.00000000000000000001', 'NaN')
 ORDER BY 1;

-- table_at at every step.
SELECT count(*) AS table_at_answers,
       count(*) FILTER (WHERE f IS DISTINCT FROM c OR f IS DISTINCT FROM m OR f IS DISTINCT FROM z) AS differing
  FROM (SELECT (SELECT array_agg(v::text ORDER BY v::text) FROM audit.table_at('tf', at) v) f,
               (SELECT array_agg(v::text ORDER BY v::text) FROM audit.table_at('tc', at) v) c,
               (SELECT array_agg(v::text ORDER BY v::text) FROM audit.table_at('tm', at) v) m,
               (SELECT array_agg(v::text ORDER BY v::text) FROM audit.table_at('tz', at) v) z
          FROM marks) s;

-- history: the same operations and states for every key.
SELECT count(*) AS keys,
       count(*) FILTER (WHERE f IS DISTINCT FROM c OR f IS DISTINCT FROM m OR f IS DISTINCT FROM z) AS differing
  FROM (SELECT (SELECT array_agg(ROW(h.operation, h.changed_fields, h.old_values::text, h.state::text)::text ORDER BY h.id)
                  FROM audit.history('tf', k::text) h) f,
               (SELECT array_agg(ROW(h.operation, h.changed_fields, h.old_values::text, h.state::text)::text ORDER BY h.id)
                  FROM audit.history('tc', k::text) h) c,
               (SELECT array_agg(ROW(h.operation, h.changed_fields, h.old_values::text, h.state::text)::text ORDER BY h.id)
                  FROM audit.history('tm', k::text) h) m,
               (SELECT array_agg(ROW(h.operation, h.changed_fields, h.old_values::text, h.state::text)::text ORDER BY h.id)
                  FROM audit.history('tz', k::text) h) z
          FROM generate_series(1, 8) k) s;
-- Each history state is what state_at says just after that change.
SELECT count(*) FILTER (WHERE h.state::text IS DISTINCT FROM audit.state_at('tc', k::text, h.changed_at)::text) AS history_vs_state_at
  FROM generate_series(1, 8) k, audit.history('tc', k::text) h;

-- The live tables are what the log says (verify_table), and the chain holds.
SELECT ok, detail FROM audit.verify_table('tf');
SELECT ok, detail FROM audit.verify_table('tc');
SELECT ok, detail FROM audit.verify_table('tm');
SELECT ok, detail FROM audit.verify_table('tz');
SELECT bool_and(new_values - changed_fields = '{}') AS tz_updates_changed_only
  FROM audit.log WHERE table_name = 'tz' AND operation = 'UPDATE' AND old_row_id IS NULL;
SELECT ok FROM audit.verify();

-- undo of a transaction that changed the three tables: the same result.
CREATE TEMP TABLE last_change AS
SELECT m.step, m.txid FROM marks m
 WHERE EXISTS (SELECT FROM audit.log l WHERE l.txid = m.txid AND l.table_name = 'tc')
 ORDER BY m.step DESC LIMIT 1;
SELECT audit.undo((SELECT txid FROM last_change)) AS undone;
SELECT (SELECT array_agg(t::text ORDER BY id) FROM tf t) = (SELECT array_agg(t::text ORDER BY id) FROM tc t)
   AND (SELECT array_agg(t::text ORDER BY id) FROM tf t) = (SELECT array_agg(t::text ORDER BY id) FROM tm t)
   AND (SELECT array_agg(t::text ORDER BY id) FROM tf t) = (SELECT array_agg(t::text ORDER BY id) FROM tz t) AS same_after_undo;
SELECT ok FROM audit.verify_table('tc');
-- Undo the undo: the table is back as it was at the end of the timeline.
SELECT audit.undo((SELECT txid FROM audit.log WHERE table_name = 'tc' ORDER BY id DESC LIMIT 1)) > 0 AS redone;
SELECT (SELECT array_agg(v::text ORDER BY v::text) FROM audit.table_at('tc', (SELECT at FROM marks WHERE step = 160)) v)
     = (SELECT array_agg(to_jsonb(t)::text ORDER BY to_jsonb(t)::text) FROM tc t) AS back_to_step_160;

-- A row older than tracking and never baselined, tracked in 'changes' mode:
-- its state comes from the live row, but verify_table cannot explain it.
CREATE TABLE tn (id int PRIMARY KEY, a int, b int);
INSERT INTO tn VALUES (1, 1, 1);
SELECT audit.track('tn', capture => 'changes');
INSERT INTO marks VALUES (1000, clock_timestamp(), 0);
SET audit.image_every = 0;  -- no whole image by chance: this UPDATE writes only a
UPDATE tn SET a = 2;
RESET audit.image_every;
SELECT new_values - changed_fields = '{}' AS changed_only FROM audit.log WHERE table_name = 'tn';
SELECT audit.state_at('tn', '1', (SELECT at FROM marks WHERE step = 1000)) AS before_update;
SELECT operation, state FROM audit.history('tn', '1');
SELECT ok, detail FROM audit.verify_table('tn');
SELECT audit.baseline('tn');
SELECT ok, detail FROM audit.verify_table('tn');

-- A TRUNCATE after the moment asked about: both modes answer from the changes
-- before it, or refuse alike.
CREATE TABLE uf (id int PRIMARY KEY, a int, b int);
CREATE TABLE uc (LIKE uf INCLUDING ALL);
SELECT audit.track('uf'), audit.track('uc', capture => 'changes');
INSERT INTO uf VALUES (1, 0, 0);
INSERT INTO uc VALUES (1, 0, 0);
DO $$ BEGIN
  FOR i IN 1..40 LOOP
    UPDATE uf SET a = i WHERE id = 1;
    UPDATE uc SET a = i WHERE id = 1;
    IF i % 7 = 0 THEN
      UPDATE uf SET b = i WHERE id = 1;
      UPDATE uc SET b = i WHERE id = 1;
    END IF;
  END LOOP;
END $$;
INSERT INTO marks VALUES (2000, clock_timestamp(), 0);
UPDATE uf SET a = -1;
UPDATE uc SET a = -1;
TRUNCATE uf, uc;
SELECT audit.state_at('uf', '1', (SELECT at FROM marks WHERE step = 2000)) AS full_mode,
       audit.state_at('uc', '1', (SELECT at FROM marks WHERE step = 2000)) AS changes_mode;
SELECT audit.state_at('uc', '1', (SELECT at FROM marks WHERE step = 2000) + interval '1 hour');
SELECT audit.state_at('uf', '1', (SELECT at FROM marks WHERE step = 2000) + interval '1 hour');
