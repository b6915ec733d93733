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
DROP TABLE audit.pruned_blocks;
