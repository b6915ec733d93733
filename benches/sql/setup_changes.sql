-- Variant changes: audit_ext with capture => 'changes' (an UPDATE stores only
-- its changed columns); otherwise as setup_audit_ext.sql.
SET client_min_messages = warning;
CREATE EXTENSION audit_ext;
-- The partitions for now and the next months, as the background worker or a
-- scheduled job would have made them before any real traffic (the harness
-- pauses the worker). Without them every row would go to audit.log_default.
SELECT audit.maintain();
SELECT audit.track('bench', capture => 'changes');
