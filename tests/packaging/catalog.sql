-- Everything audit_ext defines in a database, one sorted line per property,
-- read from the catalogs. The upgrade test (scripts/package-test upgrade)
-- prints this for a database upgraded with ALTER EXTENSION audit_ext UPDATE and
-- for a fresh CREATE EXTENSION of the same version, and fails if they differ:
-- a change to sql/ or src/ that the upgrade script misses shows up here.
--
-- Partitions made by audit.maintain() are not compared (their names depend on
-- the date; they are not members of the extension); audit.log_default is.
-- Run with psql -XAt.
WITH ext AS (
  SELECT e.oid, e.extnamespace AS nsp FROM pg_catalog.pg_extension e WHERE e.extname = 'audit_ext'
),
members AS (
  SELECT d.classid, d.objid, d.objsubid
    FROM pg_catalog.pg_depend d, ext
   WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
),
rels AS (   -- tables, views, sequences of the extension's schema, less maintain()'s partitions
  SELECT c.oid, c.relname
    FROM pg_catalog.pg_class c, ext
   WHERE c.relnamespace = ext.nsp AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c')
     AND (NOT c.relispartition
          OR EXISTS (SELECT FROM members m WHERE m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND m.objid = c.oid))
),
lines(line) AS (
  SELECT 'extension relocatable=' || e.extrelocatable || ' schema=' || e.extnamespace::pg_catalog.regnamespace
         || ' config=' || COALESCE((SELECT pg_catalog.string_agg(x::pg_catalog.regclass::text, ',' ORDER BY x::pg_catalog.regclass::text)
                                       FROM pg_catalog.unnest(e.extconfig) x), '')
         || ' conditions=' || COALESCE((SELECT pg_catalog.string_agg(x, ',' ORDER BY x) FROM pg_catalog.unnest(e.extcondition) x), '')
    FROM pg_catalog.pg_extension e WHERE e.extname = 'audit_ext'
  UNION ALL
  SELECT 'schema ' || n.nspname || ' acl=' || COALESCE(n.nspacl::text, 'default')
         || ' comment=' || COALESCE(pg_catalog.obj_description(n.oid, 'pg_namespace'), '')
    FROM pg_catalog.pg_namespace n, ext WHERE n.oid = ext.nsp
  UNION ALL
  SELECT 'member ' || pg_catalog.pg_describe_object(classid, objid, objsubid) FROM members
  UNION ALL
  SELECT 'function ' || p.oid::pg_catalog.regprocedure::text
         || ' args=(' || pg_catalog.pg_get_function_arguments(p.oid) || ')'
         || ' returns=' || COALESCE(pg_catalog.pg_get_function_result(p.oid), '')
         || ' kind=' || p.prokind::text || ' language=' || l.lanname || ' volatility=' || p.provolatile::text
         || ' parallel=' || p.proparallel::text || ' strict=' || p.proisstrict || ' security_definer=' || p.prosecdef
         || ' leakproof=' || p.proleakproof || ' cost=' || p.procost || ' rows=' || p.prorows
         || ' config=' || COALESCE(p.proconfig::text, '') || ' acl=' || COALESCE(p.proacl::text, 'default')
         || ' bin=' || COALESCE(p.probin, '') || ' src=' || CASE WHEN l.lanname = 'c' THEN p.prosrc ELSE pg_catalog.md5(p.prosrc) END
         || ' comment=' || COALESCE(pg_catalog.obj_description(p.oid, 'pg_proc'), '')
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang, ext
   WHERE p.pronamespace = ext.nsp
  UNION ALL
  SELECT 'relation ' || c.relname || ' kind=' || c.relkind::text || ' persistence=' || c.relpersistence::text
         || ' rls=' || c.relrowsecurity || ' replident=' || c.relreplident::text
         || ' options=' || COALESCE(c.reloptions::text, '') || ' acl=' || COALESCE(c.relacl::text, 'default')
         || ' partkey=' || COALESCE(pg_catalog.pg_get_partkeydef(c.oid), '')
         || ' bound=' || COALESCE(pg_catalog.pg_get_expr(c.relpartbound, c.oid), '')
         || ' view=' || COALESCE(pg_catalog.pg_get_viewdef(c.oid), '')
         || ' comment=' || COALESCE(pg_catalog.obj_description(c.oid, 'pg_class'), '')
    FROM pg_catalog.pg_class c JOIN rels r ON r.oid = c.oid
  UNION ALL
  SELECT 'column ' || r.relname || '.' || a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
         || ' num=' || a.attnum || ' notnull=' || a.attnotnull
         || ' default=' || COALESCE(pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), '')
         || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
         || ' collation=' || COALESCE(NULLIF(a.attcollation, 0)::pg_catalog.regcollation::text, '')
         || ' acl=' || COALESCE(a.attacl::text, 'default')
         || ' comment=' || COALESCE(pg_catalog.col_description(a.attrelid, a.attnum), '')
    FROM pg_catalog.pg_attribute a JOIN rels r ON r.oid = a.attrelid
    LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
   WHERE a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT 'constraint ' || r.relname || '.' || co.conname || ' ' || pg_catalog.pg_get_constraintdef(co.oid)
         || ' deferrable=' || co.condeferrable || ' validated=' || co.convalidated
    FROM pg_catalog.pg_constraint co JOIN rels r ON r.oid = co.conrelid
  UNION ALL
  SELECT 'index ' || pg_catalog.pg_get_indexdef(i.indexrelid)
         || ' primary=' || i.indisprimary || ' unique=' || i.indisunique
    FROM pg_catalog.pg_index i JOIN rels r ON r.oid = i.indrelid
  UNION ALL
  SELECT 'trigger ' || pg_catalog.pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
    FROM pg_catalog.pg_trigger t JOIN rels r ON r.oid = t.tgrelid
   WHERE NOT t.tgisinternal
  UNION ALL
  SELECT 'policy ' || r.relname || '.' || po.polname || ' cmd=' || po.polcmd::text || ' permissive=' || po.polpermissive
         || ' using=' || COALESCE(pg_catalog.pg_get_expr(po.polqual, po.polrelid), '')
         || ' check=' || COALESCE(pg_catalog.pg_get_expr(po.polwithcheck, po.polrelid), '')
    FROM pg_catalog.pg_policy po JOIN rels r ON r.oid = po.polrelid
  UNION ALL
  SELECT 'rule ' || ru.rulename || ' ' || pg_catalog.pg_get_ruledef(ru.oid)
    FROM pg_catalog.pg_rewrite ru JOIN rels r ON r.oid = ru.ev_class
   WHERE ru.rulename <> '_RETURN'
  UNION ALL
  SELECT 'sequence ' || r.relname || ' type=' || s.seqtypid::pg_catalog.regtype || ' start=' || s.seqstart
         || ' increment=' || s.seqincrement || ' min=' || s.seqmin || ' max=' || s.seqmax
         || ' cache=' || s.seqcache || ' cycle=' || s.seqcycle
    FROM pg_catalog.pg_sequence s JOIN rels r ON r.oid = s.seqrelid
  UNION ALL
  SELECT 'event_trigger ' || et.evtname || ' on=' || et.evtevent || ' function=' || et.evtfoid::pg_catalog.regproc
         || ' enabled=' || et.evtenabled::text || ' tags=' || COALESCE(et.evttags::text, '')
    FROM pg_catalog.pg_event_trigger et JOIN pg_catalog.pg_proc p ON p.oid = et.evtfoid, ext
   WHERE p.pronamespace = ext.nsp
  UNION ALL
  SELECT 'type ' || t.oid::pg_catalog.regtype || ' kind=' || t.typtype::text
    FROM pg_catalog.pg_type t, ext
   WHERE t.typnamespace = ext.nsp AND t.typtype NOT IN ('c', 'b') -- row types and arrays come with their relations
  UNION ALL
  SELECT 'default_acl ' || d.defaclobjtype::text || ' ' || d.defaclacl::text
    FROM pg_catalog.pg_default_acl d, ext WHERE d.defaclnamespace = ext.nsp
)
SELECT line FROM lines ORDER BY line COLLATE "C";
