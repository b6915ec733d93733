-- Upgrade test: a fingerprint of the audit data and the tracked tables, taken
-- before and after the upgrade; it must not change. Columns are listed, so a
-- column added by a later version does not count as a change. psql -XAt.
SELECT 'log ' || count(*) || ' ' || pg_catalog.md5(COALESCE(pg_catalog.string_agg(pg_catalog.concat_ws('|',
         id, changed_at, txid, schema_name, table_name, operation, row_id, old_row_id, old_values, new_values,
         changed_fields, changed_by, db_user, session_info, pg_catalog.encode(row_hash, 'hex')), E'\n' ORDER BY id), ''))
  FROM audit.log;
SELECT 'blocks ' || count(*) || ' ' || pg_catalog.md5(COALESCE(pg_catalog.string_agg(pg_catalog.concat_ws('|',
         block_id, from_id, through_id, first_id, last_id, row_count, pg_catalog.encode(root, 'hex'),
         pg_catalog.encode(prev_hash, 'hex'), pg_catalog.encode(block_hash, 'hex'), sealed_at), E'\n' ORDER BY block_id), ''))
  FROM audit.blocks;
SELECT 'tracked ' || pg_catalog.string_agg(pg_catalog.concat_ws('|', relid, exclude, redact, tracked_since), ';' ORDER BY relid::text)
  FROM audit.tracked;
SELECT 'secret ' || pg_catalog.md5(key) FROM audit.secret;
SELECT 'log_id_seq ' || last_value FROM audit.log_id_seq;
SELECT 'partitions ' || pg_catalog.string_agg(inhrelid::pg_catalog.regclass::text, ',' ORDER BY inhrelid::pg_catalog.regclass::text)
  FROM pg_catalog.pg_inherits WHERE inhparent = 'audit.log'::pg_catalog.regclass;
SELECT 'users ' || pg_catalog.md5(pg_catalog.string_agg(u::text, E'\n' ORDER BY id)) FROM users u;
SELECT 'orders ' || pg_catalog.md5(pg_catalog.string_agg(o::text, E'\n' ORDER BY id, region)) FROM orders o;
