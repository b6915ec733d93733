-- DDL on tracked tables is itself recorded (operation 'DDL'), renames are followed,
-- a dropped table keeps its history and leaves audit.tracked_tables.
CREATE TABLE ddl_t (id int PRIMARY KEY, a text);
SELECT audit.track('ddl_t');
INSERT INTO ddl_t VALUES (1, 'x');
ALTER TABLE ddl_t ADD COLUMN b int;
ALTER TABLE ddl_t RENAME COLUMN b TO c;
ALTER TABLE ddl_t DISABLE TRIGGER audit_capture_row;
UPDATE ddl_t SET a = 'unseen' WHERE id = 1;
ALTER TABLE ddl_t ENABLE TRIGGER audit_capture_row;
ALTER TABLE ddl_t REPLICA IDENTITY FULL;
ALTER TABLE ddl_t DROP COLUMN c;
-- Untracked tables' DDL is not recorded.
CREATE TABLE ddl_other (id int);
ALTER TABLE ddl_other ADD COLUMN b int;
SELECT operation, new_values->>'command_tag' AS tag, new_values->>'object_identity' AS object,
       new_values->>'statement' AS statement
  FROM audit.log WHERE table_name IN ('ddl_t', 'ddl_other') ORDER BY id;
-- A rename is followed: later rows carry the new name.
ALTER TABLE ddl_t RENAME TO ddl_t2;
UPDATE ddl_t2 SET a = 'y' WHERE id = 1;
SELECT table_name, operation, new_values->>'command_tag' AS tag FROM audit.log
 WHERE table_name IN ('ddl_t', 'ddl_t2') ORDER BY id DESC LIMIT 2;
SELECT table_name FROM audit.tracked_tables WHERE table_name LIKE 'ddl%';
-- Dropping our trigger is recorded; so is audit.untrack.
DROP TRIGGER audit_capture_truncate ON ddl_t2;
SELECT audit.untrack('ddl_t2');
SELECT operation, new_values->>'command_tag' AS tag, new_values->>'object_identity' AS object
  FROM audit.log WHERE table_name = 'ddl_t2' AND operation = 'DDL' ORDER BY id;
-- A dropped tracked table: recorded, history kept, gone from tracked_tables.
CREATE TABLE ddl_gone (id int PRIMARY KEY);
SELECT audit.track('ddl_gone');
INSERT INTO ddl_gone VALUES (1);
DROP TABLE ddl_gone;
SELECT operation, new_values->>'command_tag' AS tag, new_values->>'object_identity' AS object
  FROM audit.log WHERE table_name = 'ddl_gone' ORDER BY id;
SELECT count(*) AS still_tracked FROM audit.tracked WHERE relid::text = 'ddl_gone';
SELECT count(*) AS listed FROM audit.tracked_tables WHERE table_name = 'ddl_gone';
-- DDL rows are hashed and sealed like any other.
SELECT audit.seal() > 0 AS sealed;
SELECT ok FROM audit.verify();
-- A partition of a tracked table cannot be untracked on its own.
CREATE TABLE ddl_parted (id int PRIMARY KEY) PARTITION BY RANGE (id);
CREATE TABLE ddl_parted_1 PARTITION OF ddl_parted FOR VALUES FROM (0) TO (100);
SELECT audit.track('ddl_parted');
\set VERBOSITY sqlstate
SELECT audit.untrack('ddl_parted_1');
\set VERBOSITY default
SELECT audit.untrack('ddl_parted');
DROP TABLE ddl_parted, ddl_other;
