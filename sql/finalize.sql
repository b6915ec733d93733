-- Runs last in the install script.

-- The first partitions. They are not members of the extension, so pg_dump
-- carries them (and their rows) like the ones maintain() makes later.
SELECT audit.maintain();
DO $$
DECLARE p regclass;
BEGIN
  FOR p IN SELECT inhrelid::regclass FROM pg_inherits
            WHERE inhparent = 'audit.log'::regclass AND inhrelid <> 'audit.log_default'::regclass LOOP
    EXECUTE format('ALTER EXTENSION audit_ext DROP TABLE %s', p);
  END LOOP;
END $$;

-- Lock everything down: nothing in audit is granted to PUBLIC.
REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON SCHEMA audit FROM PUBLIC;

-- No background worker ships yet, so maintenance is always the user's to schedule.
DO $$
BEGIN
  RAISE NOTICE 'audit_ext: schedule maintenance, e.g. with pg_cron: SELECT cron.schedule(''audit-maintain'', ''* * * * *'', $c$SELECT audit.maintain(); SELECT audit.seal()$c$);';
END $$;
