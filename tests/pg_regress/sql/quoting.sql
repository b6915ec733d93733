-- Names that need quoting everywhere SQL is built: reserved words, mixed case,
-- spaces, quotes and backslashes, in the schema, the table and its columns. Every
-- function works on them (undo of an UPDATE and of a DELETE among them).
SET standard_conforming_strings = off;
SET escape_string_warning = off;
CREATE SCHEMA "Select Schema";
CREATE TABLE "Select Schema"."select" ("order" int PRIMARY KEY, "user" text, "group" text, "Mixed Case" text,
                                       "it's" text, "back\slash" text, "a""quote" text);
SELECT audit.track('"Select Schema"."select"', exclude => ARRAY[E'back\\slash'], redact => ARRAY['a"quote']);
INSERT INTO "Select Schema"."select" VALUES (1, 'u1', 'g1', 'M1', 'i1', 'b1', 'q1'), (2, 'u2', 'g2', 'M2', 'i2', 'b2', 'q2');
CREATE TEMP TABLE q_marks (name text PRIMARY KEY, at timestamptz);
INSERT INTO q_marks VALUES ('t0', clock_timestamp());
SELECT pg_sleep(0.01);
BEGIN;
UPDATE "Select Schema"."select" SET "user" = 'changed', "group" = 'changed', "it's" = 'changed' WHERE "order" = 1;
DELETE FROM "Select Schema"."select" WHERE "order" = 2;
SELECT txid_current() AS q_tx \gset
COMMIT;
SELECT schema_name, table_name, operation, row_id, changed_fields FROM audit.log
 WHERE table_name = 'select' ORDER BY id;
SELECT audit.state_at('"Select Schema"."select"', '1', (SELECT at FROM q_marks WHERE name = 't0')) - 'a"quote' AS state_t0;
SELECT count(*) AS rows_t0 FROM audit.table_at('"Select Schema"."select"', (SELECT at FROM q_marks WHERE name = 't0'));
SELECT operation, changed_fields FROM audit.history('"Select Schema"."select"', '1') ORDER BY id;
-- undo of the UPDATE (the redacted column was not changed) and of the DELETE.
SELECT audit.undo(:q_tx) AS restored;
SELECT "order", "user", "group", "Mixed Case", "it's", "back\slash" IS NULL AS excluded_null, "a""quote" IS NULL AS redacted_null
  FROM "Select Schema"."select" ORDER BY 1;
SELECT audit.untrack('"Select Schema"."select"');
RESET standard_conforming_strings;
RESET escape_string_warning;
SELECT ok FROM audit.verify();
