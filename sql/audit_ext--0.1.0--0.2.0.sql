-- audit_ext 0.1.0 -> 0.2.0, run by ALTER EXTENSION audit_ext UPDATE.
-- Hand-written; frozen once 0.2.0 is released (docs/packaging.md, sql/released.sha256).
-- Each statement is what a fresh install of 0.2.0 has: the CREATE FUNCTION is
-- copied from the generated audit_ext--0.2.0.sql, the privileges follow
-- sql/finalize.sql. scripts/package-test upgrade compares the result with a
-- fresh install.
\echo Use "ALTER EXTENSION audit_ext UPDATE TO '0.2.0'" to load this file. \quit

/* <begin connected objects> */
-- src/version.rs:42
-- audit_ext::version::version
CREATE  FUNCTION "version"() RETURNS jsonb /* JsonB */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'version_wrapper';
/* </end connected objects> */

REVOKE ALL ON FUNCTION audit.version() FROM PUBLIC;

-- One BRIN index on (id, txid) per partition instead of one on each column
-- (sql/schema.sql, partitions::dress_partition): each audit row then costs one
-- BRIN insert, not two. Building it reads each partition once.
DO $$
DECLARE
  part pg_catalog.text;
BEGIN
  FOR part IN
    SELECT c.relname FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.inhrelid
     WHERE i.inhparent OPERATOR(pg_catalog.=) 'audit.log'::pg_catalog.regclass
  LOOP
    EXECUTE pg_catalog.format('DROP INDEX IF EXISTS audit.%I, audit.%I', part OPERATOR(pg_catalog.||) '_id_brin', part OPERATOR(pg_catalog.||) '_txid_brin');
    EXECUTE pg_catalog.format('CREATE INDEX IF NOT EXISTS %I ON audit.%I USING brin (id, txid)', part OPERATOR(pg_catalog.||) '_brin', part);
  END LOOP;
END
$$;

-- The log's btrees do not deduplicate (sql/schema.sql, partitions::CHANGES): every
-- entry ends in the row's unique id, so a full page was searched for duplicates
-- in vain before each split. Existing entries stay as they are; no rebuild.
DO $$
DECLARE
  idx pg_catalog.regclass;
BEGIN
  FOR idx IN
    SELECT x.indexrelid::pg_catalog.regclass
      FROM pg_catalog.pg_inherits i
      JOIN pg_catalog.pg_index x ON x.indrelid OPERATOR(pg_catalog.=) i.inhrelid
      JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) x.indexrelid
      JOIN pg_catalog.pg_am a ON a.oid OPERATOR(pg_catalog.=) c.relam
     WHERE i.inhparent OPERATOR(pg_catalog.=) 'audit.log'::pg_catalog.regclass
       AND a.amname OPERATOR(pg_catalog.=) 'btree'
       AND c.relname OPERATOR(pg_catalog.~) '_(old_)?row_idx$'
  LOOP
    EXECUTE pg_catalog.format('ALTER INDEX %s SET (deduplicate_items = off)', idx);
  END LOOP;
END
$$;

-- The sealer waits for the transactions that hold audit ids, not for every
-- transaction with an xid (src/chain/writers.rs): its candidate names those
-- transactions. A pending candidate of 0.1.0 is dropped; the next seal makes a new one.
DROP TABLE audit.seal_state;
CREATE TABLE audit.seal_state (
    id              int      PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    pending_id      bigint,
    pending_writers bigint[]
);
REVOKE ALL ON TABLE audit.seal_state FROM PUBLIC;

-- Retention records (src/chain/prune.rs): what retention removes is committed into the
-- chain. What 0.1.0's retention kept (audit.pruned, audit.pruned_blocks) is committed
-- now, as one retention record made at upgrade time.
ALTER TABLE audit.blocks ADD COLUMN kind text NOT NULL DEFAULT 'rows' CHECK (kind IN ('rows', 'prune'));
CREATE TABLE audit.prune_parts (
    prune_block bigint  NOT NULL,
    block_id    bigint  NOT NULL,
    removed     bigint  NOT NULL,
    rows_hash   bytea   NOT NULL,
    completes   boolean NOT NULL,
    PRIMARY KEY (prune_block, block_id)
);
SELECT pg_catalog.pg_extension_config_dump('audit.prune_parts', '');
REVOKE ALL ON TABLE audit.prune_parts FROM PUBLIC;
ALTER TABLE audit.pruned ADD COLUMN prune_block bigint;
/* <begin connected objects> */
-- audit_ext::chain::prune::adopt_pruned
CREATE  FUNCTION "_adopt_pruned"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'adopt_pruned_wrapper';
/* </end connected objects> */
REVOKE ALL ON FUNCTION audit._adopt_pruned() FROM PUBLIC;
SELECT audit._adopt_pruned();
ALTER TABLE audit.pruned ALTER COLUMN prune_block SET NOT NULL;
-- Out of the extension first: that also takes it off the list of tables pg_dump
-- dumps (extconfig), which a plain DROP would leave holding a dangling oid.
ALTER EXTENSION audit_ext DROP TABLE audit.pruned_blocks;
DROP TABLE audit.pruned_blocks;

-- audit.status(): the last maintenance and sealing run, their outcome, and what waits to be sealed.
CREATE TABLE audit.status_state (
    id              int         PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    maintain_at     timestamptz,
    maintain_ok     boolean,
    maintain_detail text,
    seal_at         timestamptz,
    seal_ok         boolean,
    seal_detail     text
);
REVOKE ALL ON TABLE audit.status_state FROM PUBLIC;
/* <begin connected objects> */
-- audit_ext::status::status
CREATE  FUNCTION "status"() RETURNS TABLE (
	"last_maintain_at" timestamp with time zone,  /* core::option::Option<pgrx::datum::time_stamp_with_timezone::TimestampWithTimeZone> */
	"maintain_ok" bool,  /* core::option::Option<bool> */
	"maintain_detail" TEXT,  /* core::option::Option<alloc::string::String> */
	"last_seal_at" timestamp with time zone,  /* core::option::Option<pgrx::datum::time_stamp_with_timezone::TimestampWithTimeZone> */
	"seal_ok" bool,  /* core::option::Option<bool> */
	"seal_detail" TEXT,  /* core::option::Option<alloc::string::String> */
	"unsealed_rows" bigint,  /* core::option::Option<i64> */
	"oldest_unsealed_age" interval  /* core::option::Option<pgrx::datum::interval::Interval> */
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'status_wrapper';
/* </end connected objects> */
REVOKE ALL ON FUNCTION audit.status() FROM PUBLIC;

-- The names each tracked table has had (time travel follows renames of the table and
-- of its schema). What 0.1.0 tracked is known under its current name, since always.
CREATE TABLE audit.table_names (
    relid       regclass    NOT NULL,
    schema_name text        NOT NULL,
    table_name  text        NOT NULL,
    valid_from  timestamptz NOT NULL,
    PRIMARY KEY (relid, valid_from)
);
SELECT pg_catalog.pg_extension_config_dump('audit.table_names', '');
REVOKE ALL ON TABLE audit.table_names FROM PUBLIC;
INSERT INTO audit.table_names (relid, schema_name, table_name, valid_from)
SELECT t.relid, n.nspname::pg_catalog.text, c.relname::pg_catalog.text, '-infinity'
  FROM audit.tracked t
  JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid
  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace;

-- The event triggers' functions as sql/finalize.sql now has them: capture triggers are
-- found by their function and cannot be renamed or replaced; DDL on a partition of a
-- tracked table is recorded; renames are followed; a dropped table's names are forgotten.
CREATE OR REPLACE FUNCTION audit._on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT c.command_tag, tg.tgname::text AS tgname, tg.tgrelid::regclass::text AS tbl,
                  tg.tgfoid OPERATOR(pg_catalog.=) 'audit.capture()'::pg_catalog.regprocedure
                    AND tg.tgqual IS NULL AND COALESCE(pg_catalog.array_length(tg.tgattr, 1), 0) OPERATOR(pg_catalog.=) 0
                    AND ((tg.tgname OPERATOR(pg_catalog.=) 'audit_capture_row' AND tg.tgtype OPERATOR(pg_catalog.=) 29)
                      OR (tg.tgname OPERATOR(pg_catalog.=) 'audit_capture_truncate' AND tg.tgtype OPERATOR(pg_catalog.=) 32))
                    AS as_tracked
             FROM pg_catalog.pg_event_trigger_ddl_commands() c
             JOIN pg_catalog.pg_trigger tg ON tg.oid OPERATOR(pg_catalog.=) c.objid
            WHERE c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_trigger'::pg_catalog.regclass
              AND (tg.tgfoid OPERATOR(pg_catalog.=) 'audit.capture()'::pg_catalog.regprocedure
                   OR tg.tgname::text OPERATOR(pg_catalog.~~) 'audit\_capture\_%') LOOP
    IF r.command_tag OPERATOR(pg_catalog.<>) 'CREATE TRIGGER' OR NOT r.as_tracked THEN
      RAISE EXCEPTION 'audit_ext: % refused for capture trigger "%" on %', r.command_tag, r.tgname, r.tbl
        USING ERRCODE = '42501',
              HINT = 'Capture triggers are made by audit.track() and removed by audit.untrack(); they cannot be renamed or replaced.';
    END IF;
  END LOOP;
  FOR r IN SELECT DISTINCT c.command_tag, n.nspname::text AS nsp, cl.relname::text AS rel,
                  pg_catalog.quote_ident(otn.nspname) OPERATOR(pg_catalog.||) '.'
                    OPERATOR(pg_catalog.||) pg_catalog.quote_ident(ot.relname) AS ident
             FROM pg_catalog.pg_event_trigger_ddl_commands() c
             JOIN pg_catalog.pg_class ot ON ot.oid OPERATOR(pg_catalog.=) c.objid
             JOIN pg_catalog.pg_namespace otn ON otn.oid OPERATOR(pg_catalog.=) ot.relnamespace
             -- The tracked table itself, or the tracked table that a partition belongs to.
             CROSS JOIN LATERAL (SELECT t.relid
                                   FROM (SELECT c.objid::pg_catalog.regclass AS relid, 0 AS depth
                                         UNION ALL
                                         SELECT a.relid, 1 FROM pg_catalog.pg_partition_ancestors(c.objid) a) a
                                   JOIN audit.tracked t ON t.relid OPERATOR(pg_catalog.=) a.relid
                                  ORDER BY a.depth LIMIT 1) tr
             JOIN pg_catalog.pg_class cl ON cl.oid OPERATOR(pg_catalog.=) tr.relid
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) cl.relnamespace
            WHERE c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
              -- Only while capture is attached: a restore's post-data DDL (keys,
              -- indexes) comes before the dumped triggers and is not history.
              AND EXISTS (SELECT FROM pg_catalog.pg_trigger tg
                           WHERE tg.tgrelid OPERATOR(pg_catalog.=) c.objid
                             AND tg.tgfoid OPERATOR(pg_catalog.=) 'audit.capture()'::pg_catalog.regprocedure) LOOP
    PERFORM audit._record_ddl(r.nsp, r.rel, r.command_tag, r.ident, pg_catalog.current_query());
  END LOOP;
  -- A tracked table renamed, moved to another schema, or in a schema renamed: its new
  -- name, from now on (audit.table_names; two renames in one transaction keep the last).
  IF EXISTS (SELECT FROM pg_catalog.pg_event_trigger_ddl_commands() c
              WHERE c.command_tag OPERATOR(pg_catalog.=) ANY (ARRAY['ALTER TABLE', 'ALTER SCHEMA'])) THEN
    INSERT INTO audit.table_names AS x (relid, schema_name, table_name, valid_from)
    SELECT t.relid, n.nspname::text, c.relname::text, pg_catalog.now()
      FROM audit.tracked t
      JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE NOT EXISTS (SELECT FROM (SELECT l.schema_name, l.table_name FROM audit.table_names l
                                     WHERE l.relid OPERATOR(pg_catalog.=) t.relid
                                     ORDER BY l.valid_from DESC LIMIT 1) AS last
                        WHERE last.schema_name OPERATOR(pg_catalog.=) n.nspname::text
                          AND last.table_name OPERATOR(pg_catalog.=) c.relname::text)
    ON CONFLICT (relid, valid_from) DO UPDATE SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name;
  END IF;
END $$;

CREATE OR REPLACE FUNCTION audit._on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects() LOOP
    IF r.object_type OPERATOR(pg_catalog.=) 'table' THEN
      DELETE FROM audit.table_names n WHERE n.relid::pg_catalog.oid OPERATOR(pg_catalog.=) r.objid;
    END IF;
    IF r.object_type = 'table' AND r.schema_name = 'audit'
          AND (r.object_name IN ('log', 'blocks', 'access_log') OR r.object_name LIKE 'log\_%'
               OR r.object_name LIKE 'access\_log\_%') THEN
      PERFORM audit._check_drop('table ' || r.object_identity);
    ELSIF r.object_type = 'table' AND EXISTS (SELECT FROM audit.tracked t WHERE t.relid::oid = r.objid) THEN
      PERFORM audit._record_ddl(r.schema_name, r.object_name, 'DROP TABLE', r.object_identity, pg_catalog.current_query());
      DELETE FROM audit.tracked t WHERE t.relid::oid = r.objid;
    ELSIF r.object_type = 'trigger' AND r.original AND r.address_names[3] LIKE 'audit\_capture\_%'
          AND EXISTS (SELECT FROM audit.tracked t
                       WHERE t.relid::oid = pg_catalog.to_regclass(pg_catalog.quote_ident(r.address_names[1]) || '.'
                                                                    || pg_catalog.quote_ident(r.address_names[2]))::oid) THEN
      PERFORM audit._record_ddl(r.address_names[1], r.address_names[2], 'DROP TRIGGER', r.object_identity,
                                pg_catalog.current_query());
    END IF;
  END LOOP;
END $$;

-- The redaction key is write-once: markers already in the log are comparable
-- only with markers made by the same key (src/secret.rs says when it changes).
CREATE FUNCTION audit._guard_secret() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RAISE EXCEPTION 'audit.secret is write-once: the redaction key cannot be changed or removed'
    USING ERRCODE = 'insufficient_privilege',
          HINT = 'Redaction markers already in audit.log were made with this key.';
END $$;
CREATE TRIGGER audit_guard_secret BEFORE UPDATE OR DELETE ON audit.secret
  FOR EACH ROW EXECUTE FUNCTION audit._guard_secret();
CREATE TRIGGER audit_guard_secret_truncate BEFORE TRUNCATE ON audit.secret
  FOR EACH STATEMENT EXECUTE FUNCTION audit._guard_secret();
REVOKE ALL ON FUNCTION audit._guard_secret() FROM PUBLIC;

-- Access auditing (src/access/): what each tracked table records, and the reads.
ALTER TABLE audit.tracked ADD COLUMN writes boolean NOT NULL DEFAULT true,
                          ADD COLUMN reads  boolean NOT NULL DEFAULT false,
                          -- What an UPDATE's new_values holds (src/image.rs).
                          ADD COLUMN capture text NOT NULL DEFAULT 'full' CHECK (capture IN ('full', 'changes'));
CREATE OR REPLACE VIEW audit.tracked_tables AS
SELECT t.relid         AS tbl,
       n.nspname::text AS schema_name,
       c.relname::text AS table_name,
       t.exclude,
       t.redact,
       t.tracked_since,
       t.writes,
       t.reads,
       t.capture
  FROM audit.tracked t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace;

-- One row per statement that read a read-tracked table (src/access/). Its ids come
-- from audit.log's sequence, so one hash chain covers both tables.
CREATE TABLE audit.access_log (
    id           bigint      NOT NULL,
    accessed_at  timestamptz NOT NULL,
    schema_name  text        NOT NULL,
    table_name   text        NOT NULL,
    command      text        NOT NULL,
    columns      text[],
    rows         bigint,
    outcome      text        NOT NULL,
    sqlstate     text,
    accessed_by  text        NOT NULL,
    db_user      text        NOT NULL,
    role         text        NOT NULL,
    txid         bigint,
    session_info jsonb,
    query_id     bigint,
    statement    text,
    parameters   jsonb,
    backend_pid  integer     NOT NULL,
    row_hash     bytea       NOT NULL
) PARTITION BY RANGE (accessed_at);

COMMENT ON TABLE audit.access_log IS 'One row per statement that read a read-tracked table, and per loss of such rows (audit_ext).';

CREATE TABLE audit.access_log_default PARTITION OF audit.access_log DEFAULT;
-- Who read this table, and when: one index probe.
CREATE INDEX access_log_default_table_idx ON audit.access_log_default (table_name, accessed_at, id) WITH (deduplicate_items = off);
-- Sealing and verification walk ids.
CREATE INDEX access_log_default_brin ON audit.access_log_default USING brin (id);
SELECT pg_catalog.pg_extension_config_dump('audit.access_log_default', '');
CREATE TRIGGER audit_guard_truncate BEFORE TRUNCATE ON audit.access_log FOR EACH STATEMENT EXECUTE FUNCTION audit._guard_truncate();
CREATE TRIGGER audit_guard_truncate BEFORE TRUNCATE ON audit.access_log_default FOR EACH STATEMENT EXECUTE FUNCTION audit._guard_truncate();
REVOKE ALL ON audit.access_log, audit.access_log_default FROM PUBLIC;

DROP FUNCTION audit.track(regclass, text[], text[]);
CREATE FUNCTION audit."track"(
	"tbl" regclass,
	"exclude" TEXT[] DEFAULT '{}',
	"redact" TEXT[] DEFAULT '{}',
	"reads" bool DEFAULT false,
	"writes" bool DEFAULT true,
	"baseline" bool DEFAULT false,
	"capture" TEXT DEFAULT 'full'
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'track_wrapper';
REVOKE ALL ON FUNCTION audit.track(regclass, text[], text[], bool, bool, bool, text) FROM PUBLIC;

-- The tables themselves (src/baseline.rs, src/verify_table.rs): SNAPSHOT rows for
-- rows the log does not know, the live table checked against the log, and verify()
-- with a list of tables to check that way too. operation is plain text, so
-- SNAPSHOT needs no change to audit.log or to the row hash.
/* <begin connected objects> */
-- audit_ext::baseline::baseline
CREATE  FUNCTION "baseline"(
	"tbl" regclass, /* Option < PgRelation > */
	"batch_size" INT DEFAULT 10000 /* Option < i32 > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'baseline_wrapper';
/* </end connected objects> */
REVOKE ALL ON FUNCTION audit.baseline(regclass, integer) FROM PUBLIC;
/* <begin connected objects> */
-- audit_ext::verify_table::verify_table
CREATE  FUNCTION "verify_table"(
	"tbl" regclass /* Option < PgRelation > */
) RETURNS TABLE (
	"ok" bool,  /* bool */
	"rows_checked" bigint,  /* i64 */
	"missing" bigint,  /* i64 */
	"unexplained" bigint,  /* i64 */
	"changed" bigint,  /* i64 */
	"first_bad_row_id" TEXT,  /* Option < String > */
	"detail" TEXT  /* String */
)
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'verify_table_wrapper';
/* </end connected objects> */
REVOKE ALL ON FUNCTION audit.verify_table(regclass) FROM PUBLIC;
DROP FUNCTION audit.verify(jsonb);
/* <begin connected objects> */
-- audit_ext::chain::verify::verify_with_tables
CREATE FUNCTION "verify"(
	"digest" jsonb DEFAULT NULL,
	"tables" regclass[] DEFAULT NULL
) RETURNS TABLE (
	"ok" bool,
	"blocks" bigint,
	"rows" bigint,
	"first_bad_id" bigint,
	"detail" TEXT
)
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'verify_with_tables_wrapper';
/* </end connected objects> */
REVOKE ALL ON FUNCTION audit.verify(jsonb, regclass[]) FROM PUBLIC;
