-- References of the article experiment (benches/run, "stmt", "stored" and
-- "stored_chg"): what storing one audit row costs by itself, with nothing
-- computed. stored_log has audit.log's columns and the indexes every log
-- partition has (LIKE ... INCLUDING INDEXES of audit.log_default); stored_row
-- is one real UPDATE row of audit_ext (capture :capture, 'full' unless
-- setup_stored_chg.sql says otherwise), captured here once, whose bytes every
-- measured statement stores again under a fresh id and the updated row's key.
SET client_min_messages = warning;
\if :{?capture}
\else
\set capture full
\endif
CREATE EXTENSION audit_ext;
SELECT audit.maintain();
SELECT audit.track('bench', capture => :'capture');
SET audit.image_every = 0;
UPDATE bench SET email = 'user1@example.com', name = 'Name 1' WHERE id = 1;
CREATE TABLE stored_row AS SELECT * FROM audit.log WHERE operation = 'UPDATE';
CREATE TABLE stored_log (LIKE audit.log_default INCLUDING DEFAULTS INCLUDING INDEXES);
CREATE SEQUENCE stored_seq;
SET audit.allow_drop = on;
DROP EXTENSION audit_ext CASCADE;
ANALYZE stored_row;
