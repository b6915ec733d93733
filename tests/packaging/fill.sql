-- Upgrade test, step 1 (scripts/package-test upgrade): history written by the
-- previous release, before the package upgrade. Only that release's API.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
CREATE EXTENSION audit_ext;
CREATE TABLE users (id int PRIMARY KEY, email text, password_hash text, last_login_at timestamptz);
CREATE TABLE orders (id int, region text, total numeric, PRIMARY KEY (id, region));
CREATE TABLE scratch (x int);
SELECT audit.track('users', exclude => '{last_login_at}', redact => '{password_hash}');
SELECT audit.track('orders');
SELECT audit.track('scratch');
INSERT INTO users SELECT g, 'u' || g || '@example.com', 'pw' || g, now() FROM generate_series(1, 50) g;
INSERT INTO orders SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g * 1.5 FROM generate_series(1, 20) g;
BEGIN;
SET LOCAL "app.current_user" = '{"user_id": 7, "email": "alice@corp"}';
UPDATE users SET email = 'changed' || id || '@example.com' WHERE id <= 10;
UPDATE orders SET id = id + 100 WHERE id = 3;   -- a key change
COMMIT;
DELETE FROM users WHERE id > 45;
INSERT INTO scratch VALUES (1), (2);
TRUNCATE scratch;
ALTER TABLE orders ADD COLUMN note text;        -- a DDL row
SELECT audit.maintain() IS NOT NULL AS maintained;
SELECT audit.seal() > 0 AS sealed;
-- Rows that are not sealed yet when the package is upgraded.
UPDATE users SET email = 'late@example.com' WHERE id = 1;
INSERT INTO orders VALUES (500, 'eu', 1, 'late');
