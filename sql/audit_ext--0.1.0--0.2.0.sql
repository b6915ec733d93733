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
