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
