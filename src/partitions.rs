//! Partitions of the logs (audit.log, and audit.access_log): premade ranges,
//! rows moved out of the DEFAULT partition, and retention. Lock order is fixed:
//! the chain (when retention appends to it), then each log's parent, then its
//! default partition, each under a short lock_timeout with retries, so a writer
//! never waits for more than a moment.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::errors::{AuditError, OrRaise, Result};
use crate::privilege::as_extension_owner;
use crate::settings;

const LOCK_TIMEOUT: &str = "200ms";
const LOCK_RETRIES: usize = 12;
/// Wait before retry n (from 0): (n + 1) times this, so 12 attempts span about 4 s.
const RETRY_BACKOFF_US: std::ffi::c_long = 50_000;

/// One of the partitioned logs maintain() keeps, with everything that differs
/// between them. They share the partition interval, premake and retention.
struct LogTable {
    /// The parent's name in schema audit.
    parent: &'static str,
    default: &'static str,
    /// The column the partitions are ranged on.
    time_col: &'static str,
    /// Partition names: this, then the start in UTC (YYYYMMDD_HH24MI).
    prefix: &'static str,
    /// The indexes every partition gets (sql/schema.sql gives the default partition
    /// the same), as SQL with `{name}` for the partition's name. No btree of a log
    /// deduplicates: every entry ends in the row's id, so no two are ever equal, and
    /// each full leaf page would only be searched for duplicates in vain before it
    /// splits (about 4% of a baseline's time).
    indexes: &'static str,
    /// Whether removing a partition moves the horizon of time travel (changes only).
    moves_horizon: bool,
}

const CHANGES: LogTable = LogTable {
    parent: "log",
    default: "log_default",
    time_col: "changed_at",
    prefix: "log_p",
    indexes: "CREATE INDEX {name}_row_idx ON audit.{name} (table_name, row_id, changed_at, id) WITH (deduplicate_items = off);
              CREATE INDEX {name}_old_row_idx ON audit.{name} (table_name, old_row_id, changed_at, id) WITH (deduplicate_items = off) WHERE old_row_id IS NOT NULL;
              CREATE INDEX {name}_brin ON audit.{name} USING brin (id, txid);",
    moves_horizon: true,
};

const READS: LogTable = LogTable {
    parent: "access_log",
    default: "access_log_default",
    time_col: "accessed_at",
    prefix: "access_log_p",
    indexes: "CREATE INDEX {name}_table_idx ON audit.{name} (table_name, accessed_at, id) WITH (deduplicate_items = off);
              CREATE INDEX {name}_brin ON audit.{name} USING brin (id);",
    moves_horizon: false,
};

/// The logs to keep, in the order their locks are taken (writers take each log's
/// parent, then its default partition): audit.access_log only once the schema has it.
fn logs() -> Result<Vec<&'static LogTable>> {
    Ok(if crate::version::schema_is_current()? { vec![&CHANGES, &READS] } else { vec![&CHANGES] })
}

struct Part {
    name: String,
    from: TimestampWithTimeZone,
    to: TimestampWithTimeZone,
}

fn partitions(t: &LogTable) -> Result<Vec<Part>> {
    Spi::connect(|c| -> Result<Vec<Part>> {
        let rows = c.select(&format!(
            "SELECT c.relname::pg_catalog.text,
                    pg_catalog.substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']*)''\\)')::pg_catalog.timestamptz,
                    pg_catalog.substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']*)''\\)')::pg_catalog.timestamptz
               FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.inhrelid
              WHERE i.inhparent OPERATOR(pg_catalog.=) 'audit.{}'::pg_catalog.regclass
                AND NOT c.relispartition IS FALSE
                AND pg_catalog.pg_get_expr(c.relpartbound, c.oid) OPERATOR(pg_catalog.<>) 'DEFAULT'
              ORDER BY 2", t.parent),
            None,
            &[],
        )?;
        let mut v = Vec::new();
        for r in rows {
            if let (Some(name), Some(from), Some(to)) = (r.get::<String>(1)?, r.get(2)?, r.get(3)?)
            {
                v.push(Part { name, from, to });
            }
        }
        Ok(v)
    })
}

/// Slot [start, end) of the partition that should hold `t`.
fn slot_of(
    t: TimestampWithTimeZone,
    interval: &str,
) -> Result<(TimestampWithTimeZone, TimestampWithTimeZone)> {
    let (a, b) = Spi::get_two_with_args::<TimestampWithTimeZone, TimestampWithTimeZone>(
        "WITH i AS (SELECT $2::pg_catalog.interval AS iv),
              s AS (SELECT CASE WHEN pg_catalog.date_part('month', iv) OPERATOR(pg_catalog.<>) 0
                                  OR pg_catalog.date_part('year', iv) OPERATOR(pg_catalog.<>) 0
                           THEN pg_catalog.date_trunc('month', $1, 'UTC')
                           ELSE pg_catalog.date_bin(iv, $1, '2000-01-01 00:00:00+00') END AS st, iv FROM i)
         SELECT st, st OPERATOR(pg_catalog.+) iv FROM s",
        &[t.into(), interval.to_string().into()],
    )?;
    Ok((
        a.ok_or(AuditError::Internal("no slot".into()))?,
        b.ok_or(AuditError::Internal("no slot".into()))?,
    ))
}

fn add_interval(t: TimestampWithTimeZone, interval: &str) -> Result<TimestampWithTimeZone> {
    Spi::get_one_with_args::<TimestampWithTimeZone>(
        "SELECT $1 OPERATOR(pg_catalog.+) $2::pg_catalog.interval",
        &[t.into(), interval.to_string().into()],
    )?
    .ok_or(AuditError::Internal("interval arithmetic".into()))
}

/// Takes the parent, then the default partition: the order writers take them
/// in too (capture::sink), so the two can never wait for each other in a cycle.
/// `parent` is SHARE UPDATE EXCLUSIVE to attach partitions (writers go on), or
/// ACCESS EXCLUSIVE to drop or detach them (writers wait a moment). The caller
/// has set lock_timeout to `LOCK_TIMEOUT`: a lock held longer fails with 55P03,
/// and the caller then rolls back and retries (see `with_lock_retries`).
fn lock_in_order(t: &LogTable, parent: &str, default: bool) -> Result<()> {
    Spi::run(&format!("LOCK TABLE audit.{} IN {parent} MODE", t.parent))?;
    if default {
        Spi::run(&format!("LOCK TABLE audit.{} IN EXCLUSIVE MODE", t.default))?;
    }
    Ok(())
}

/// Runs `f` in a subtransaction; when it meets a lock timeout, rolls it back
/// (releasing every lock it took, so writers go on) and tries again a little
/// later. `None` when every attempt met one.
fn with_lock_retries<R>(
    f: impl Fn() -> Result<R> + std::panic::RefUnwindSafe,
) -> Result<Option<R>> {
    for attempt in 0..LOCK_RETRIES {
        match crate::subxact::run(&f, |e| e.code == PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE) {
            Ok(r) => return r.map(Some),
            Err(_) => {
                // SAFETY: a plain sleep; interrupts are honoured between attempts.
                unsafe {
                    pg_sys::pg_usleep(RETRY_BACKOFF_US * (attempt as std::ffi::c_long + 1));
                    pgrx::check_for_interrupts!();
                }
            }
        }
    }
    Ok(None)
}

/// Creates the partition [from, to), moving any of its rows out of the default partition.
fn create_partition(
    t: &LogTable,
    from: TimestampWithTimeZone,
    to: TimestampWithTimeZone,
) -> Result<(String, i64)> {
    let name = Spi::get_one_with_args::<String>(
        "SELECT $2 OPERATOR(pg_catalog.||) pg_catalog.to_char($1 AT TIME ZONE 'UTC', 'YYYYMMDD_HH24MI')",
        &[from.into(), t.prefix.into()],
    )?
    .unwrap_or_default();
    let bounds = |t: TimestampWithTimeZone| -> Result<String> {
        Ok(Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.quote_literal($1::pg_catalog.text)",
            &[t.into()],
        )?
        .unwrap_or_default())
    };
    let (f, tl) = (bounds(from)?, bounds(to)?);
    let (parent, default, col) = (t.parent, t.default, t.time_col);
    let waiting = Spi::get_one_with_args::<i64>(
        &format!(
            "SELECT pg_catalog.count(*) FROM audit.{default}
              WHERE {col} OPERATOR(pg_catalog.>=) $1 AND {col} OPERATOR(pg_catalog.<) $2"
        ),
        &[from.into(), to.into()],
    )?
    .unwrap_or(0);
    // Made apart and then attached, never CREATE TABLE … PARTITION OF: that takes
    // ACCESS EXCLUSIVE on audit.log, which writers would wait for. ATTACH needs only
    // SHARE UPDATE EXCLUSIVE there (and the CHECK constraint spares it a scan).
    Spi::run(&format!("CREATE TABLE audit.{name} (LIKE audit.{parent} INCLUDING DEFAULTS)"))?;
    Spi::run(&format!(
        "ALTER TABLE audit.{name} ADD CONSTRAINT {name}_range
           CHECK ({col} OPERATOR(pg_catalog.>=) {f} AND {col} OPERATOR(pg_catalog.<) {to_lit})",
        to_lit = tl
    ))?;
    if waiting > 0 {
        Spi::run("SET LOCAL audit.allow_drop = on")?;
        Spi::run_with_args(
            &format!(
                "WITH moved AS (DELETE FROM audit.{default}
                                 WHERE {col} OPERATOR(pg_catalog.>=) $1 AND {col} OPERATOR(pg_catalog.<) $2 RETURNING *)
                 INSERT INTO audit.{name} SELECT * FROM moved"
            ),
            &[from.into(), to.into()],
        )?;
    }
    Spi::run(&format!(
        "ALTER TABLE audit.{parent} ATTACH PARTITION audit.{name} FOR VALUES FROM ({f}) TO ({tl})"
    ))?;
    Spi::run(&format!("ALTER TABLE audit.{name} DROP CONSTRAINT {name}_range"))?;
    dress_partition(t, &name)?;
    Ok((name, waiting))
}

/// The indexes of the log's default partition (sql/schema.sql), and the TRUNCATE guard.
fn dress_partition(t: &LogTable, name: &str) -> Result<()> {
    Spi::run(&t.indexes.replace("{name}", name))?;
    Spi::run(&format!(
        "CREATE TRIGGER audit_guard_truncate BEFORE TRUNCATE ON audit.{name}
           FOR EACH STATEMENT EXECUTE FUNCTION audit._guard_truncate()"
    ))?;
    Ok(())
}

pub fn maintain_impl(as_of: Option<TimestampWithTimeZone>) -> Result<Value> {
    crate::query::refuse_during_recovery(c"audit.maintain()");
    let as_of = as_of.ok_or(AuditError::NullArgument("as_of"))?;
    let interval = settings::partition_interval();
    let premake = settings::PREMAKE.get();
    // This transaction's audit rows may hold the current partition open; moving or
    // dropping partitions needs it closed.
    crate::log::sink::release();
    // Like a function's SET clause: lock_timeout and allow_drop set below end with this call.
    // SAFETY: a GUC nest level, closed right after; on ERROR, abort unwinds it.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    let r = with_lock_retries(|| maintain_locked(as_of, &interval, premake));
    // SAFETY: closes the level opened above, keeping nothing set inside it.
    unsafe { pg_sys::AtEOXact_GUC(false, level) };
    match r? {
        Some(report) => {
            crate::status::record(crate::status::Run::Maintain, Ok(report.to_string()))?;
            Ok(report)
        }
        None => {
            // Writers were never kept waiting; the next run will do the work.
            notice!(
                "audit.maintain: audit.log stayed busy, nothing was done; the next run tries again"
            );
            Ok(json!({"as_of": as_of.to_string(), "interval": interval, "busy": true,
                      "created": [], "moved_from_default": 0, "retention": [], "retention_skipped": []}))
        }
    }
}

/// What maintain() will do to one log.
struct Plan {
    log: &'static LogTable,
    wanted: Vec<(TimestampWithTimeZone, TimestampWithTimeZone)>,
    expired: Vec<Part>,
}

/// Plans one log's work from reads that take no lock a writer minds: the slots
/// wanted (every slot holding rows in the default partition, and now .. now +
/// premake) that no partition covers, and the partitions retention removes.
fn plan(
    t: &'static LogTable,
    as_of: TimestampWithTimeZone,
    interval: &str,
    premake: i32,
    cutoff: Option<TimestampWithTimeZone>,
    kept: &mut Vec<Value>,
) -> Result<Plan> {
    let mut wanted: Vec<(TimestampWithTimeZone, TimestampWithTimeZone)> = Vec::new();
    let stray: Vec<TimestampWithTimeZone> =
        Spi::connect(|c| -> Result<Vec<TimestampWithTimeZone>> {
            let mut v = Vec::new();
            let sql = format!(
                "SELECT DISTINCT pg_catalog.date_trunc('hour', {}) FROM audit.{}",
                t.time_col, t.default
            );
            for r in c.select(&sql, None, &[])? {
                if let Some(t) = r.get::<TimestampWithTimeZone>(1)? {
                    v.push(t);
                }
            }
            Ok(v)
        })?;
    for t in stray {
        wanted.push(slot_of(t, interval)?);
    }
    let (mut a, mut b) = slot_of(as_of, interval)?;
    for _ in 0..=premake {
        wanted.push((a, b));
        a = b;
        b = add_interval(a, interval)?;
    }
    wanted.sort_by_key(|w| pg_sys::TimestampTz::from(w.0));
    wanted.dedup_by_key(|w| pg_sys::TimestampTz::from(w.0));
    let existing = partitions(t)?;
    wanted.retain(|(from, to)| !existing.iter().any(|p| p.from < *to && *from < p.to));
    let mut expired = Vec::new();
    if let Some(cutoff) = cutoff {
        let (_, sealed_through, _) = crate::chain::seal::chain_head()?;
        let current = crate::version::schema_is_current()?;
        for p in existing.into_iter().filter(|p| p.to <= cutoff) {
            if !current {
                kept.push(json!({"partition": p.name, "why": "run ALTER EXTENSION audit_ext UPDATE first"}));
                continue;
            }
            let max_id =
                Spi::get_one::<i64>(&format!("SELECT pg_catalog.max(id) FROM audit.{}", p.name))?;
            if max_id.is_some_and(|m| m > sealed_through) {
                kept.push(json!({"partition": p.name, "why": "has rows not sealed yet: run audit.seal() first"}));
                continue;
            }
            expired.push(p);
        }
    }
    Ok(Plan { log: t, wanted, expired })
}

/// Removes one expired partition, after committing its rows to the chain.
fn remove(t: &LogTable, p: &Part) -> Result<Value> {
    crate::chain::prune::record(&p.name)?;
    if t.moves_horizon {
        Spi::run_with_args(
            "INSERT INTO audit.horizon (id, horizon) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET horizon = GREATEST(audit.horizon.horizon, EXCLUDED.horizon)",
            &[p.to.into()],
        )?;
    }
    Spi::run("SET LOCAL audit.allow_drop = on")?;
    if settings::retention_detach() {
        let have = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname OPERATOR(pg_catalog.=) 'audit_archive')",
        )?;
        if have != Some(true) {
            Spi::run("CREATE SCHEMA audit_archive")?;
            Spi::run("REVOKE ALL ON SCHEMA audit_archive FROM PUBLIC")?;
        }
        Spi::run(&format!("ALTER TABLE audit.{} DETACH PARTITION audit.{}", t.parent, p.name))?;
        Spi::run(&format!("ALTER TABLE audit.{} SET SCHEMA audit_archive", p.name))?;
        Ok(json!({"partition": p.name, "action": "detached"}))
    } else {
        Spi::run(&format!("DROP TABLE audit.{}", p.name))?;
        Ok(json!({"partition": p.name, "action": "dropped"}))
    }
}

fn maintain_locked(as_of: TimestampWithTimeZone, interval: &str, premake: i32) -> Result<Value> {
    let interval = interval.to_string();
    as_extension_owner(|| {
        let cutoff = match settings::retention() {
            None => None,
            Some(ret) => Some(
                Spi::get_one_with_args::<TimestampWithTimeZone>(
                    "SELECT $1 OPERATOR(pg_catalog.-) $2::pg_catalog.interval",
                    &[as_of.into(), ret.into()],
                )?
                .ok_or(AuditError::Internal("retention arithmetic".into()))?,
            ),
        };
        // First what there is to do, from reads that take no lock a writer minds.
        let mut kept = Vec::new();
        let mut plans = Vec::new();
        for t in logs()? {
            plans.push(plan(t, as_of, &interval, premake, cutoff, &mut kept)?);
        }

        // Then the locks that work needs: the chain first if retention appends to it
        // (the sealer holds it while it reads the logs), then each log's parent before
        // its default partition. Removing partitions needs the parent alone, adding
        // them needs the default partition too.
        let busy: Vec<&Plan> =
            plans.iter().filter(|p| !p.wanted.is_empty() || !p.expired.is_empty()).collect();
        if !busy.is_empty() {
            Spi::run(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))?;
            if busy.iter().any(|p| !p.expired.is_empty()) {
                crate::chain::seal::lock_chain()?;
            }
            for p in &busy {
                let parent = if p.expired.is_empty() {
                    "SHARE UPDATE EXCLUSIVE"
                } else {
                    "ACCESS EXCLUSIVE"
                };
                lock_in_order(p.log, parent, !p.wanted.is_empty())?;
            }
        }
        let mut created = Vec::new();
        let mut moved = 0i64;
        let mut removed = Vec::new();
        for p in plans {
            // Another maintain() may have made or removed some of them while we waited.
            let existing = partitions(p.log)?;
            for (from, to) in p
                .wanted
                .into_iter()
                .filter(|(f, t)| !existing.iter().any(|e| e.from < *t && *f < e.to))
            {
                let (name, n) = create_partition(p.log, from, to)?;
                moved += n;
                created.push(name);
            }
            for part in p.expired.iter().filter(|x| existing.iter().any(|e| e.name == x.name)) {
                removed.push(remove(p.log, part)?);
            }
        }
        Ok(json!({
            "as_of": as_of.to_string(),
            "interval": interval,
            "created": created,
            "moved_from_default": moved,
            "retention": removed,
            "retention_skipped": kept,
        }))
    })
}

#[pg_extern(volatile, parallel_unsafe)]
fn maintain(as_of: default!(Option<TimestampWithTimeZone>, "now()")) -> JsonB {
    JsonB(maintain_impl(as_of).or_raise())
}
