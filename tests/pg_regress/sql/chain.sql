-- Sealing, verify and digests; tampering as a superuser is always detected.
CREATE TABLE ledger (id int PRIMARY KEY, amount numeric);
SELECT audit.track('ledger');
INSERT INTO ledger SELECT g, g * 10 FROM generate_series(1, 50) g;
SELECT audit.seal() > 0 AS sealed_some;
SELECT audit.seal() AS sealed_again;
SELECT ok, detail LIKE 'ok:%' AS ok_detail, first_bad_id FROM audit.verify();
CREATE TEMP TABLE d AS SELECT audit.digest() AS digest;
SELECT digest ? 'block_id' AND digest ? 'block_hash' AND digest ? 'last_id' AND digest ? 'sealed_at' AS digest_shape FROM d;
SELECT ok FROM audit.verify((SELECT digest FROM d));
INSERT INTO ledger VALUES (100, 1);
-- Unsealed rows are still checked against their own hash.
SELECT ok, rows - blocks >= 0 AS counted FROM audit.verify();

CREATE TEMP TABLE victim AS SELECT * FROM audit.log WHERE table_name = 'ledger' ORDER BY id LIMIT 5;
SET session_replication_role = replica;

-- A changed row.
UPDATE audit.log SET changed_by = 'mallory' WHERE id = (SELECT id FROM victim OFFSET 2 LIMIT 1);
SELECT ok, first_bad_id = (SELECT id FROM victim OFFSET 2 LIMIT 1) AS right_row, detail FROM audit.verify();
UPDATE audit.log l SET changed_by = v.changed_by FROM victim v WHERE l.id = v.id;
SELECT ok FROM audit.verify();

-- A changed row whose row_hash was recomputed consistently (the algorithm is public): the block root catches it.
UPDATE audit.log SET row_hash = (SELECT row_hash FROM audit.log WHERE id = (SELECT id FROM victim OFFSET 3 LIMIT 1))
 WHERE id = (SELECT id FROM victim OFFSET 2 LIMIT 1);
SELECT ok, first_bad_id IS NOT NULL AS has_bad_id FROM audit.verify();
UPDATE audit.log l SET row_hash = v.row_hash FROM victim v WHERE l.id = v.id;

-- A deleted row.
DELETE FROM audit.log WHERE id = (SELECT id FROM victim OFFSET 1 LIMIT 1);
SELECT ok, detail FROM audit.verify();
INSERT INTO audit.log SELECT * FROM victim WHERE id = (SELECT id FROM victim OFFSET 1 LIMIT 1);
SELECT ok FROM audit.verify();

-- A row inserted into a sealed range (a copy with a fresh id below the horizon).
INSERT INTO audit.log SELECT -1, changed_at, txid, schema_name, table_name, operation, row_id, old_row_id,
       old_values, new_values, changed_fields, changed_by, db_user, session_info, row_hash FROM victim LIMIT 1;
SELECT ok, detail FROM audit.verify();
DELETE FROM audit.log WHERE id = -1;

-- Reordered rows: two rows swap ids.
UPDATE audit.log SET id = -id WHERE id IN (SELECT id FROM victim LIMIT 2);
UPDATE audit.log SET id = (SELECT min(id) FROM victim) WHERE id = -(SELECT max(id) FROM (SELECT id FROM victim LIMIT 2) s);
UPDATE audit.log SET id = (SELECT max(id) FROM (SELECT id FROM victim LIMIT 2) s) WHERE id = -(SELECT min(id) FROM victim);
SELECT ok FROM audit.verify();
DELETE FROM audit.log WHERE id IN (SELECT id FROM victim LIMIT 2);
INSERT INTO audit.log SELECT * FROM victim v WHERE v.id IN (SELECT id FROM victim LIMIT 2);
SELECT ok FROM audit.verify();

-- A changed, deleted or relinked block.
CREATE TEMP TABLE b1 AS SELECT * FROM audit.blocks WHERE block_id = 1;
UPDATE audit.blocks SET row_count = row_count + 1 WHERE block_id = 1;
SELECT ok, detail FROM audit.verify();
UPDATE audit.blocks SET row_count = (SELECT row_count FROM b1) WHERE block_id = 1;
INSERT INTO ledger VALUES (101, 1);
SELECT audit.seal() > 0 AS sealed_block_2;
UPDATE audit.blocks SET prev_hash = '\x00'::bytea WHERE block_id = 2;
SELECT ok, detail FROM audit.verify();
DELETE FROM audit.blocks WHERE block_id = 1;
SELECT ok, detail FROM audit.verify();
INSERT INTO audit.blocks SELECT * FROM b1;

-- A consistently rewritten chain passes verify alone, but not against a digest held outside.
DELETE FROM audit.blocks WHERE block_id = 2;
UPDATE audit.blocks SET sealed_at = sealed_at + interval '1 second' WHERE block_id = 1;
SELECT ok FROM audit.verify();
DELETE FROM audit.blocks;
DELETE FROM audit.seal_state;
RESET session_replication_role;
SELECT audit.seal() > 0 AS resealed;
SELECT ok FROM audit.verify();
SELECT ok, detail FROM audit.verify((SELECT digest FROM d));
-- A partial digest proves nothing and is refused, not passed.
\set VERBOSITY sqlstate
SELECT ok FROM audit.verify((SELECT digest - 'block_hash' FROM d));
SELECT ok FROM audit.verify(jsonb_build_object('block_id', 1, 'block_hash', repeat('0', 63)));
