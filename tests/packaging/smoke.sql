-- Install test (scripts/package-test install): the packaged extension on a
-- fresh cluster of Debian's PostgreSQL 15. psql variables: version (the
-- package's), preload (true or false: audit_ext in shared_preload_libraries).
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
CREATE FUNCTION pg_temp.check(ok boolean, what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF ok IS NOT TRUE THEN RAISE EXCEPTION 'check failed: %', what; END IF;
END $$;

CREATE EXTENSION audit_ext;
SELECT pg_temp.check(extversion = :'version', 'installed version is ' || extversion)
  FROM pg_extension WHERE extname = 'audit_ext';
SELECT pg_temp.check(v->>'extension_version' = :'version' AND v->>'library_version' = :'version'
                     AND (v->>'background_worker')::boolean = :'preload'::boolean
                     AND (v->>'launcher_running')::boolean = :'preload'::boolean
                     AND (v->>'postgresql_version_num')::int / 10000 = 15,
                     'audit.version() = ' || v::text)
  FROM audit.version() v;

CREATE TABLE users (id int PRIMARY KEY, email text, password_hash text, last_login_at timestamptz);
SELECT audit.track('users', exclude => '{last_login_at}', redact => '{password_hash}');
SELECT pg_temp.check(count(*) = 1, 'audit.tracked_tables') FROM audit.tracked_tables WHERE table_name = 'users';

BEGIN;
SET LOCAL "app.current_user" = 'alice@corp';
INSERT INTO users VALUES (1, 'a@example.com', 'secret', now()), (2, 'b@example.com', 'x', now());
COMMIT;
UPDATE users SET email = 'new@example.com' WHERE id = 1;
UPDATE users SET last_login_at = now() WHERE id = 2;   -- excluded column only: no row
DELETE FROM users WHERE id = 2;

SELECT pg_temp.check(count(*) = 4, 'four log rows, got ' || count(*)) FROM audit.log WHERE table_name = 'users';
SELECT pg_temp.check(changed_by = 'alice@corp' AND new_values->>'password_hash' LIKE 'redacted:%'
                     AND NOT new_values ? 'last_login_at', 'insert row of id 1')
  FROM audit.log WHERE table_name = 'users' AND operation = 'INSERT' AND row_id = '1';
SELECT pg_temp.check(old_values->>'email' = 'a@example.com' AND changed_fields = '{email}', 'update row')
  FROM audit.log WHERE table_name = 'users' AND operation = 'UPDATE';
SELECT pg_temp.check(count(*) = 2, 'history of id 1') FROM audit.history('users', '1');
SELECT pg_temp.check(audit.state_at('users', '2', now())  IS NULL, 'state_at after delete');
SELECT pg_temp.check(count(*) = 1, 'table_at') FROM audit.table_at('users', now());

-- undo the UPDATE: the email comes back
SELECT pg_temp.check(audit.undo(txid) = 1, 'undo') FROM audit.log WHERE table_name = 'users' AND operation = 'UPDATE';
SELECT pg_temp.check(email = 'a@example.com', 'undone') FROM users WHERE id = 1;

SELECT pg_temp.check(audit.maintain() ? 'created', 'maintain');
SELECT pg_temp.check(audit.seal() > 0, 'seal');
SELECT pg_temp.check((audit.digest()->>'through_id')::bigint >= (SELECT max(id) FROM audit.log), 'digest covers every row');
SELECT pg_temp.check(ok, 'verify: ' || COALESCE(detail, '')) FROM audit.verify(audit.digest());
SELECT pg_temp.check(ok AND rows >= 5, 'verify without digest') FROM audit.verify();

SELECT audit.untrack('users');
SELECT pg_temp.check(count(*) = 0, 'untracked') FROM audit.tracked_tables;

-- DROP EXTENSION is refused while the log holds rows, and allowed on purpose
DO $$
BEGIN
  DROP EXTENSION audit_ext;
  RAISE EXCEPTION 'DROP EXTENSION was not refused';
EXCEPTION WHEN object_in_use THEN NULL;
END $$;
SET audit.allow_drop = on;
DROP EXTENSION audit_ext CASCADE;
SELECT pg_temp.check(NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'audit_ext'), 'extension dropped');
