-- Runs last in the install script.

-- DDL on tracked tables is recorded, and audit data is guarded (see src/ddl.rs).
-- SECURITY DEFINER: the DDL's author needs no privilege in schema audit.
--
-- Capture triggers (those that run audit.capture(), whatever they are called, and
-- those named like ours) are audit.track()'s alone: renaming one, or creating or
-- replacing one in any other shape, is refused, so capture cannot be moved out
-- of sight and then dropped. Every other DDL on a tracked table or on any of its
-- partitions (ENABLE/DISABLE TRIGGER among it) is recorded under the tracked table.
CREATE FUNCTION audit._on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT c.command_tag, tg.tgname::text AS tgname, tg.tgrelid::regclass::text AS tbl,
                  tg.tgfoid OPERATOR(pg_catalog.=) 'audit.capture()'::pg_catalog.regprocedure
                    AND tg.tgqual IS NULL AND COALESCE(pg_catalog.array_length(tg.tgattr, 1), 0) OPERATOR(pg_catalog.=) 0
                    AND ((tg.tgname OPERATOR(pg_catalog.=) 'audit_capture_row' AND tg.tgtype OPERATOR(pg_catalog.=) 29)
                      OR (tg.tgname OPERATOR(pg_catalog.=) 'audit_capture_truncate' AND tg.tgtype OPERATOR(pg_catalog.=) 32))
                    AS as_tracked
             FROM pg_catalog.pg_event_trigger_ddl_commands() c
             JOIN pg_catalog.pg_trigger tg ON tg.oid OPERATOR(pg_catalog.=) c.objid
            WHERE c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_trigger'::pg_catalog.regclass
              AND (tg.tgfoid OPERATOR(pg_catalog.=) 'audit.capture()'::pg_catalog.regprocedure
                   OR tg.tgname::text OPERATOR(pg_catalog.~~) 'audit\_capture\_%') LOOP
    IF r.command_tag OPERATOR(pg_catalog.<>) 'CREATE TRIGGER' OR NOT r.as_tracked THEN
      RAISE EXCEPTION 'audit_ext: % refused for capture trigger "%" on %', r.command_tag, r.tgname, r.tbl
        USING ERRCODE = '42501',
              HINT = 'Capture triggers are made by audit.track() and removed by audit.untrack(); they cannot be renamed or replaced.';
    END IF;
  END LOOP;
  FOR r IN SELECT DISTINCT c.command_tag, n.nspname::text AS nsp, cl.relname::text AS rel,
                  pg_catalog.quote_ident(otn.nspname) OPERATOR(pg_catalog.||) '.'
                    OPERATOR(pg_catalog.||) pg_catalog.quote_ident(ot.relname) AS ident
             FROM pg_catalog.pg_event_trigger_ddl_commands() c
             JOIN pg_catalog.pg_class ot ON ot.oid OPERATOR(pg_catalog.=) c.objid
             JOIN pg_catalog.pg_namespace otn ON otn.oid OPERATOR(pg_catalog.=) ot.relnamespace
             -- The tracked table itself, or the tracked table that a partition belongs to.
             CROSS JOIN LATERAL (SELECT t.relid
                                   FROM (SELECT c.objid::pg_catalog.regclass AS relid, 0 AS depth
                                         UNION ALL
                                         SELECT a.relid, 1 FROM pg_catalog.pg_partition_ancestors(c.objid) a) a
                                   JOIN audit.tracked t ON t.relid OPERATOR(pg_catalog.=) a.relid
                                  ORDER BY a.depth LIMIT 1) tr
             JOIN pg_catalog.pg_class cl ON cl.oid OPERATOR(pg_catalog.=) tr.relid
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) cl.relnamespace
            WHERE c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
              -- Only while capture is attached: a restore's post-data DDL (keys,
              -- indexes) comes before the dumped triggers and is not history.
              AND EXISTS (SELECT FROM pg_catalog.pg_trigger tg
                           WHERE tg.tgrelid OPERATOR(pg_catalog.=) c.objid
                             AND tg.tgfoid OPERATOR(pg_catalog.=) 'audit.capture()'::pg_catalog.regprocedure) LOOP
    PERFORM audit._record_ddl(r.nsp, r.rel, r.command_tag, r.ident, pg_catalog.current_query());
  END LOOP;
  -- A tracked table renamed, moved to another schema, or in a schema renamed: its new
  -- name, from now on (audit.table_names; two renames in one transaction keep the last).
  IF EXISTS (SELECT FROM pg_catalog.pg_event_trigger_ddl_commands() c
              WHERE c.command_tag OPERATOR(pg_catalog.=) ANY (ARRAY['ALTER TABLE', 'ALTER SCHEMA'])) THEN
    INSERT INTO audit.table_names AS x (relid, schema_name, table_name, valid_from)
    SELECT t.relid, n.nspname::text, c.relname::text, pg_catalog.now()
      FROM audit.tracked t
      JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE NOT EXISTS (SELECT FROM (SELECT l.schema_name, l.table_name FROM audit.table_names l
                                     WHERE l.relid OPERATOR(pg_catalog.=) t.relid
                                     ORDER BY l.valid_from DESC LIMIT 1) AS last
                        WHERE last.schema_name OPERATOR(pg_catalog.=) n.nspname::text
                          AND last.table_name OPERATOR(pg_catalog.=) c.relname::text)
    ON CONFLICT (relid, valid_from) DO UPDATE SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name;
  END IF;
END $$;

CREATE FUNCTION audit._on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects() LOOP
    IF r.object_type OPERATOR(pg_catalog.=) 'table' THEN
      DELETE FROM audit.table_names n WHERE n.relid::pg_catalog.oid OPERATOR(pg_catalog.=) r.objid;
    END IF;
    IF r.object_type = 'table' AND r.schema_name = 'audit'
          AND (r.object_name IN ('log', 'blocks', 'access_log') OR r.object_name LIKE 'log\_%'
               OR r.object_name LIKE 'access\_log\_%') THEN
      PERFORM audit._check_drop('table ' || r.object_identity);
    ELSIF r.object_type = 'table' AND EXISTS (SELECT FROM audit.tracked t WHERE t.relid::oid = r.objid) THEN
      PERFORM audit._record_ddl(r.schema_name, r.object_name, 'DROP TABLE', r.object_identity, pg_catalog.current_query());
      DELETE FROM audit.tracked t WHERE t.relid::oid = r.objid;
    ELSIF r.object_type = 'trigger' AND r.original AND r.address_names[3] LIKE 'audit\_capture\_%'
          AND EXISTS (SELECT FROM audit.tracked t
                       WHERE t.relid::oid = pg_catalog.to_regclass(pg_catalog.quote_ident(r.address_names[1]) || '.'
                                                                    || pg_catalog.quote_ident(r.address_names[2]))::oid) THEN
      PERFORM audit._record_ddl(r.address_names[1], r.address_names[2], 'DROP TRIGGER', r.object_identity,
                                pg_catalog.current_query());
    END IF;
  END LOOP;
END $$;

CREATE FUNCTION audit._guard_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM audit._check_drop('table ' || pg_catalog.quote_ident(TG_TABLE_SCHEMA) || '.' || pg_catalog.quote_ident(TG_TABLE_NAME));
  RETURN NULL;
END $$;

-- DROP EXTENSION audit_ext (or DROP SCHEMA audit): refused while the log holds rows.
CREATE FUNCTION audit._on_drop_start() RETURNS event_trigger LANGUAGE c AS 'MODULE_PATHNAME', 'audit_on_drop_start';
CREATE EVENT TRIGGER audit_drop_guard ON ddl_command_start WHEN TAG IN ('DROP EXTENSION', 'DROP SCHEMA')
  EXECUTE FUNCTION audit._on_drop_start();
CREATE EVENT TRIGGER audit_ddl ON ddl_command_end EXECUTE FUNCTION audit._on_ddl();
CREATE EVENT TRIGGER audit_drop ON sql_drop EXECUTE FUNCTION audit._on_drop();
CREATE TRIGGER audit_guard_truncate BEFORE TRUNCATE ON audit.log FOR EACH STATEMENT EXECUTE FUNCTION audit._guard_truncate();
CREATE TRIGGER audit_guard_truncate BEFORE TRUNCATE ON audit.log_default FOR EACH STATEMENT EXECUTE FUNCTION audit._guard_truncate();
CREATE TRIGGER audit_guard_truncate BEFORE TRUNCATE ON audit.access_log FOR EACH STATEMENT EXECUTE FUNCTION audit._guard_truncate();
CREATE TRIGGER audit_guard_truncate BEFORE TRUNCATE ON audit.access_log_default FOR EACH STATEMENT EXECUTE FUNCTION audit._guard_truncate();
CREATE TRIGGER audit_guard_truncate BEFORE TRUNCATE ON audit.blocks FOR EACH STATEMENT EXECUTE FUNCTION audit._guard_truncate();

-- The redaction key is write-once: markers already in the log are comparable
-- only with markers made by the same key (src/secret.rs says when it changes).
CREATE FUNCTION audit._guard_secret() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RAISE EXCEPTION 'audit.secret is write-once: the redaction key cannot be changed or removed'
    USING ERRCODE = 'insufficient_privilege',
          HINT = 'Redaction markers already in audit.log were made with this key.';
END $$;
CREATE TRIGGER audit_guard_secret BEFORE UPDATE OR DELETE ON audit.secret
  FOR EACH ROW EXECUTE FUNCTION audit._guard_secret();
CREATE TRIGGER audit_guard_secret_truncate BEFORE TRUNCATE ON audit.secret
  FOR EACH STATEMENT EXECUTE FUNCTION audit._guard_secret();

-- The first partitions. They are not members of the extension, so pg_dump
-- carries them (and their rows) like the ones maintain() makes later. A restore
-- brings its own: pg_dump's scripts and pg_restore run SET row_security = off
-- (which PostgreSQL leaves alone inside extension scripts, unlike
-- check_function_bodies), and then only the default partition is made here; it
-- catches every write until the next maintain().
DO $$
DECLARE p regclass;
BEGIN
  IF NOT pg_catalog.current_setting('row_security')::bool THEN
    RETURN;
  END IF;
  PERFORM audit.maintain();
  FOR p IN SELECT inhrelid::regclass FROM pg_inherits
            WHERE (inhparent = 'audit.log'::regclass AND inhrelid <> 'audit.log_default'::regclass)
               OR (inhparent = 'audit.access_log'::regclass AND inhrelid <> 'audit.access_log_default'::regclass) LOOP
    EXECUTE format('ALTER EXTENSION audit_ext DROP TABLE %s', p);
  END LOOP;
END $$;

-- Lock everything down: nothing in audit is granted to PUBLIC.
REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON SCHEMA audit FROM PUBLIC;

-- Without preload there is no background worker: maintenance is the user's to schedule.
DO $$
BEGIN
  IF NOT 'audit_ext' = ANY (pg_catalog.string_to_array(
        pg_catalog.replace(pg_catalog.current_setting('shared_preload_libraries'), ' ', ''), ',')) THEN
    -- CREATE EXTENSION hides a script's notices; this one is meant to be read.
    PERFORM pg_catalog.set_config('client_min_messages', 'notice', true);
    RAISE NOTICE 'audit_ext: no background worker (audit_ext is not in shared_preload_libraries); schedule maintenance, e.g. with pg_cron: SELECT cron.schedule(''audit-maintain'', ''* * * * *'', $c$SELECT audit.maintain(); SELECT audit.seal()$c$);';
  END IF;
END $$;
