//! audit.track / audit.untrack: attach or remove the capture triggers and record
//! the per-table options. Checks run as the caller; the writes run as the
//! extension owner, because PUBLIC has no privilege on anything in `audit`.

use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgRelation;

use crate::capture::cache;
use crate::db_text::{DbText, RelNames};
use crate::errors::{AuditError, OrRaise, Result};
use crate::privilege::as_extension_owner;

pub const ROW_TRIGGER: &str = "audit_capture_row";
pub const TRUNCATE_TRIGGER: &str = "audit_capture_truncate";

/// Refuse what cannot be tracked, and callers who do not own the table; the
/// table's names, for what follows.
pub(crate) fn check_trackable(rel: &PgRelation) -> Result<RelNames> {
    let names = crate::db_text::rel_names(rel)?;
    let name = names.qualified();
    // SAFETY: rd_rel is valid while the relation is open.
    let (relkind, persistence) =
        unsafe { ((*rel.rd_rel).relkind as u8, (*rel.rd_rel).relpersistence as u8) };
    if relkind != pg_sys::RELKIND_RELATION && relkind != pg_sys::RELKIND_PARTITIONED_TABLE {
        return Err(AuditError::WrongObjectType { table: name });
    }
    let ns = &names.schema;
    if ns == "pg_catalog" || ns == "information_schema" || ns.starts_with("pg_toast") {
        return Err(AuditError::NotTrackable {
            table: name,
            why: "system catalogs cannot be tracked",
        });
    }
    if ns == "audit" || ns == "audit_archive" {
        return Err(AuditError::NotTrackable {
            table: name,
            why: "audit_ext's own tables cannot be tracked",
        });
    }
    if persistence == pg_sys::RELPERSISTENCE_TEMP {
        return Err(AuditError::NotTrackable {
            table: name,
            why: "temporary tables vanish with their session; track a permanent table",
        });
    }
    // SAFETY: GetUserId is the current effective role; ownercheck reads the syscache.
    let owns = unsafe {
        #[cfg(feature = "pg15")]
        {
            pg_sys::pg_class_ownercheck(rel.oid(), pg_sys::GetUserId())
        }
        #[cfg(not(feature = "pg15"))]
        {
            pg_sys::object_ownercheck(pg_sys::RelationRelationId, rel.oid(), pg_sys::GetUserId())
        }
    };
    if !owns {
        return Err(AuditError::NotOwner { table: name });
    }
    Ok(names)
}

fn invalidate_tree(relid: Oid) -> Result<()> {
    let parts: Vec<Oid> = Spi::connect(|c| -> Result<Vec<Oid>> {
        let rows = c.select(
            "SELECT relid::pg_catalog.oid FROM pg_catalog.pg_partition_tree($1)",
            None,
            &[relid.into()],
        )?;
        let mut v = Vec::new();
        for r in rows {
            if let Some(o) = r.get::<Oid>(1)? {
                v.push(o);
            }
        }
        Ok(v)
    })?;
    for p in parts.into_iter().chain(std::iter::once(relid)) {
        cache::forget(p);
        // SAFETY: queues a relcache invalidation for other backends at commit.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(p) };
    }
    Ok(())
}

fn clean_list(v: Option<Vec<Option<DbText>>>) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for item in v.unwrap_or_default() {
        let s = item.ok_or(AuditError::NullArgument("exclude/redact element"))?;
        // Column names: ASCII outside a UTF-8 database, like every identifier.
        let s = crate::db_text::ident_text(&s)?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// What audit.track() records for a table.
pub struct Record {
    pub writes: bool,
    pub reads: bool,
    pub capture: Capture,
}

/// What an UPDATE's audit row holds (`audit.track(…, capture => …)`):
/// crate::image says how both are read back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Capture {
    /// new_values is the whole new row (0.1.0's contract).
    Full,
    /// new_values holds only the changed columns, as old_values does.
    Changes,
}

impl Capture {
    pub fn parse(s: &str) -> Result<Capture> {
        match s {
            "full" => Ok(Capture::Full),
            "changes" => Ok(Capture::Changes),
            other => Err(AuditError::InvalidArgument(format!(
                "capture must be 'full' or 'changes', not '{other}'"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Capture::Full => "full",
            Capture::Changes => "changes",
        }
    }
}

pub fn track_impl(
    rel: Option<PgRelation>,
    exclude: Option<Vec<Option<DbText>>>,
    redact: Option<Vec<Option<DbText>>>,
    what: Record,
) -> Result<()> {
    crate::query::refuse_during_recovery(c"audit.track()");
    let rel = rel.ok_or(AuditError::NullArgument("tbl"))?;
    let exclude = clean_list(exclude)?;
    let redact = clean_list(redact)?;
    let names = check_trackable(&rel)?;
    let name = names.qualified();
    if !what.writes && !what.reads {
        return Err(AuditError::NothingToRecord { table: name });
    }
    if what.reads && !crate::access::preloaded() {
        return Err(AuditError::ReadsNeedPreload { table: name });
    }
    if what.reads && !crate::settings::serves_this_database() {
        return Err(AuditError::ReadsNotServed { table: name });
    }

    let tupdesc = rel.tuple_desc();
    let live: Vec<String> = tupdesc
        .iter()
        .filter(|a| !a.is_dropped())
        .map(crate::db_text::att_name)
        .collect::<Result<_>>()?;
    for col in exclude.iter().chain(redact.iter()) {
        if !live.contains(col) {
            return Err(AuditError::UnknownColumn { table: name.clone(), column: col.clone() });
        }
    }
    if let Some(both) = exclude.iter().find(|c| redact.contains(c)) {
        return Err(AuditError::ExcludedAndRedacted { column: both.clone() });
    }
    let relid = rel.oid();

    as_extension_owner(|| {
        let parent_tracked = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_partition_ancestors($1) a
                             JOIN audit.tracked t ON t.relid OPERATOR(pg_catalog.=) a.relid
                            WHERE a.relid OPERATOR(pg_catalog.<>) $1)
                 OR EXISTS (SELECT 1 FROM pg_catalog.pg_partition_tree($1) p
                             JOIN audit.tracked t ON t.relid OPERATOR(pg_catalog.=) p.relid
                            WHERE p.relid OPERATOR(pg_catalog.<>) $1)",
            &[relid.into()],
        )?
        .unwrap_or(false);
        if parent_tracked {
            return Err(AuditError::NotTrackable {
                table: name.clone(),
                why: "a partition and its parent cannot both be tracked; track the parent only",
            });
        }
        Spi::run(
            "INSERT INTO audit.secret (id, key)
             SELECT 1, pg_catalog.decode(pg_catalog.replace(pg_catalog.gen_random_uuid()::pg_catalog.text
                    OPERATOR(pg_catalog.||) pg_catalog.gen_random_uuid()::pg_catalog.text, '-', ''), 'hex')
             ON CONFLICT (id) DO NOTHING",
        )?;
        if crate::version::schema_is_current()? {
            Spi::run_with_args(
                "INSERT INTO audit.tracked (relid, exclude, redact, writes, reads, capture)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (relid) DO UPDATE
                   SET exclude = EXCLUDED.exclude, redact = EXCLUDED.redact,
                       writes = EXCLUDED.writes, reads = EXCLUDED.reads, capture = EXCLUDED.capture",
                &[
                    relid.into(),
                    exclude.clone().into(),
                    redact.clone().into(),
                    what.writes.into(),
                    what.reads.into(),
                    what.capture.as_str().into(),
                ],
            )?;
        } else if what.capture != Capture::Full {
            return Err(AuditError::NeedsUpdate("capture => 'changes'"));
        } else if what.reads || !what.writes {
            return Err(AuditError::NeedsUpdate("recording reads"));
        } else {
            Spi::run_with_args(
                "INSERT INTO audit.tracked (relid, exclude, redact) VALUES ($1, $2, $3)
                 ON CONFLICT (relid) DO UPDATE SET exclude = EXCLUDED.exclude, redact = EXCLUDED.redact",
                &[relid.into(), exclude.clone().into(), redact.clone().into()],
            )?;
        }
        // Its name from now on (unless it is the name audit_ext already knows it by).
        // Not "since always": a table dropped earlier may have had this name.
        Spi::run_with_args(
            "INSERT INTO audit.table_names (relid, schema_name, table_name, valid_from)
             SELECT $1, $2, $3, pg_catalog.now()
              WHERE NOT EXISTS (SELECT FROM (SELECT l.schema_name, l.table_name FROM audit.table_names l
                                              WHERE l.relid OPERATOR(pg_catalog.=) $1
                                              ORDER BY l.valid_from DESC LIMIT 1) AS last
                                 WHERE last.schema_name OPERATOR(pg_catalog.=) $2 AND last.table_name OPERATOR(pg_catalog.=) $3)
             ON CONFLICT (relid, valid_from) DO UPDATE SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name",
            &[relid.into(), names.schema.as_str().into(), names.table.as_str().into()],
        )?;
        if what.writes {
            Spi::run(&format!(
                "CREATE OR REPLACE TRIGGER {ROW_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {name} \
                 FOR EACH ROW EXECUTE FUNCTION audit.capture()"
            ))?;
            Spi::run(&format!(
                "CREATE OR REPLACE TRIGGER {TRUNCATE_TRIGGER} AFTER TRUNCATE ON {name} \
                 FOR EACH STATEMENT EXECUTE FUNCTION audit.capture()"
            ))?;
        } else {
            drop_capture_triggers(relid, &name)?;
        }
        invalidate_tree(relid)
    })?;

    // SAFETY: the relation is open.
    let has_key = !unsafe { crate::row_key::columns(rel.as_ptr()) }.is_empty();
    if !has_key {
        pgrx::notice!(
            "{name} has no primary key or replica identity index: its audit rows will have a NULL row_id, \
             and audit.state_at, audit.history and audit.undo cannot address its rows"
        );
    }
    Ok(())
}

/// Removes the capture triggers audit.track() made on the table itself (its
/// partitions' clones go with them).
fn drop_capture_triggers(relid: Oid, name: &str) -> Result<()> {
    for trigger in [ROW_TRIGGER, TRUNCATE_TRIGGER] {
        let own = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgrelid OPERATOR(pg_catalog.=) $1
                AND tgname OPERATOR(pg_catalog.=) $2 AND tgparentid OPERATOR(pg_catalog.=) 0)",
            &[relid.into(), trigger.into()],
        )?
        .unwrap_or(false);
        if own {
            Spi::run(&format!("DROP TRIGGER {trigger} ON {name}"))?;
        }
    }
    Ok(())
}

pub fn untrack_impl(rel: Option<PgRelation>) -> Result<()> {
    crate::query::refuse_during_recovery(c"audit.untrack()");
    let rel = rel.ok_or(AuditError::NullArgument("tbl"))?;
    let names = check_trackable(&rel)?;
    let name = names.qualified();
    let relid = rel.oid();
    as_extension_owner(|| {
        let tracked = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM audit.tracked WHERE relid OPERATOR(pg_catalog.=) $1)",
            &[relid.into()],
        )?
        .unwrap_or(false);
        if !tracked {
            let parent = Spi::get_one_with_args::<DbText>(
                "SELECT (SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname)
                           FROM pg_catalog.pg_partition_ancestors($1) a
                           JOIN audit.tracked t ON t.relid OPERATOR(pg_catalog.=) a.relid
                           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.relid
                           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                          WHERE a.relid OPERATOR(pg_catalog.<>) $1 LIMIT 1)",
                &[relid.into()],
            )?;
            return match parent {
                Some(parent) => {
                    Err(AuditError::TrackedViaParent { table: name.clone(), parent: parent.0 })
                }
                None => Ok(()), // idempotent
            };
        }
        // Untracked first, so the drop event trigger does not also record the trigger drops.
        Spi::run_with_args(
            "DELETE FROM audit.tracked WHERE relid OPERATOR(pg_catalog.=) $1",
            &[relid.into()],
        )?;
        drop_capture_triggers(relid, &name)?;
        invalidate_tree(relid)?;
        // The statement in the database encoding, whatever it holds (crate::db_text).
        let statement =
            Spi::get_one::<DbText>("SELECT pg_catalog.current_query()")?.unwrap_or_default().0;
        crate::ddl::record(&names.schema, &names.table, "audit.untrack", &name, &statement)
    })
}

#[pg_extern(volatile, parallel_unsafe)]
fn track(
    tbl: Option<PgRelation>,
    exclude: default!(Option<Vec<Option<DbText>>>, "'{}'"),
    redact: default!(Option<Vec<Option<DbText>>>, "'{}'"),
    reads: default!(Option<bool>, false),
    writes: default!(Option<bool>, true),
    baseline: default!(Option<bool>, false),
    capture: default!(Option<DbText>, "'full'"),
) {
    let what = Record {
        reads: reads.ok_or(AuditError::NullArgument("reads")).or_raise(),
        writes: writes.ok_or(AuditError::NullArgument("writes")).or_raise(),
        capture: capture
            .ok_or(AuditError::NullArgument("capture"))
            .and_then(|c| Capture::parse(&c.0))
            .or_raise(),
    };
    let baseline = baseline.ok_or(AuditError::NullArgument("baseline")).or_raise();
    let relid = tbl.as_ref().map(|r| r.oid());
    track_impl(tbl, exclude, redact, what).or_raise();
    if let (true, Some(relid)) = (baseline, relid) {
        // In track's own transaction, so its row locks are none but its reads are
        // one snapshot long: for a big table, track first and baseline apart.
        // SAFETY: the table was opened (and locked) by track_impl's argument already.
        let rel =
            unsafe { PgRelation::with_lock(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        let _q = crate::quiet::Quiet::enter();
        crate::baseline::baseline_impl(&rel, crate::baseline::DEFAULT_BATCH).or_raise();
    }
}

#[pg_extern(volatile, parallel_unsafe)]
fn untrack(tbl: Option<PgRelation>) {
    untrack_impl(tbl).or_raise()
}
