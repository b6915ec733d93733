//! Partitions of audit.log: premade ranges, rows moved out of the DEFAULT
//! partition, and retention. Lock order is fixed: the parent audit.log, then
//! audit.log_default, each under a short lock_timeout with retries, so a
//! writer never waits for more than a moment.

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

struct Part {
    name: String,
    from: TimestampWithTimeZone,
    to: TimestampWithTimeZone,
}

fn partitions() -> Result<Vec<Part>> {
    Spi::connect(|c| -> Result<Vec<Part>> {
        let rows = c.select(
            "SELECT c.relname::pg_catalog.text,
                    pg_catalog.substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']*)''\\)')::pg_catalog.timestamptz,
                    pg_catalog.substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']*)''\\)')::pg_catalog.timestamptz
               FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.inhrelid
              WHERE i.inhparent OPERATOR(pg_catalog.=) 'audit.log'::pg_catalog.regclass
                AND NOT c.relispartition IS FALSE
                AND pg_catalog.pg_get_expr(c.relpartbound, c.oid) OPERATOR(pg_catalog.<>) 'DEFAULT'
              ORDER BY 2",
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
fn lock_in_order(parent: &str, default: bool) -> Result<()> {
    Spi::run(&format!("LOCK TABLE audit.log IN {parent} MODE"))?;
    if default {
        Spi::run("LOCK TABLE audit.log_default IN EXCLUSIVE MODE")?;
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
    from: TimestampWithTimeZone,
    to: TimestampWithTimeZone,
) -> Result<(String, i64)> {
    let name = Spi::get_one_with_args::<String>(
        "SELECT 'log_p' OPERATOR(pg_catalog.||) pg_catalog.to_char($1 AT TIME ZONE 'UTC', 'YYYYMMDD_HH24MI')",
        &[from.into()],
    )?
    .unwrap_or_default();
    let bounds = |t: TimestampWithTimeZone| -> Result<String> {
        Ok(Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.quote_literal($1::pg_catalog.text)",
            &[t.into()],
        )?
        .unwrap_or_default())
    };
    let (f, t) = (bounds(from)?, bounds(to)?);
    let waiting = Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.count(*) FROM audit.log_default
          WHERE changed_at OPERATOR(pg_catalog.>=) $1 AND changed_at OPERATOR(pg_catalog.<) $2",
        &[from.into(), to.into()],
    )?
    .unwrap_or(0);
    // Made apart and then attached, never CREATE TABLE … PARTITION OF: that takes
    // ACCESS EXCLUSIVE on audit.log, which writers would wait for. ATTACH needs only
    // SHARE UPDATE EXCLUSIVE there (and the CHECK constraint spares it a scan).
    Spi::run(&format!("CREATE TABLE audit.{name} (LIKE audit.log INCLUDING DEFAULTS)"))?;
    Spi::run(&format!(
        "ALTER TABLE audit.{name} ADD CONSTRAINT {name}_range
           CHECK (changed_at OPERATOR(pg_catalog.>=) {f} AND changed_at OPERATOR(pg_catalog.<) {t})"
    ))?;
    if waiting > 0 {
        Spi::run("SET LOCAL audit.allow_drop = on")?;
        Spi::run_with_args(
            &format!(
                "WITH moved AS (DELETE FROM audit.log_default
                                 WHERE changed_at OPERATOR(pg_catalog.>=) $1 AND changed_at OPERATOR(pg_catalog.<) $2 RETURNING *)
                 INSERT INTO audit.{name} SELECT * FROM moved"
            ),
            &[from.into(), to.into()],
        )?;
    }
    Spi::run(&format!(
        "ALTER TABLE audit.log ATTACH PARTITION audit.{name} FOR VALUES FROM ({f}) TO ({t})"
    ))?;
    Spi::run(&format!("ALTER TABLE audit.{name} DROP CONSTRAINT {name}_range"))?;
    dress_partition(&name)?;
    Ok((name, waiting))
}

/// The indexes of audit.log_default (sql/schema.sql), and the TRUNCATE guard.
fn dress_partition(name: &str) -> Result<()> {
    Spi::run(&format!(
        "CREATE INDEX {name}_row_idx ON audit.{name} (table_name, row_id, changed_at, id);
         CREATE INDEX {name}_old_row_idx ON audit.{name} (table_name, old_row_id, changed_at, id) WHERE old_row_id IS NOT NULL;
         CREATE INDEX {name}_brin ON audit.{name} USING brin (id, txid);
         CREATE TRIGGER audit_guard_truncate BEFORE TRUNCATE ON audit.{name}
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

fn maintain_locked(as_of: TimestampWithTimeZone, interval: &str, premake: i32) -> Result<Value> {
    let interval = interval.to_string();
    as_extension_owner(|| {
        // First what there is to do, from reads that take no lock a writer minds.
        // Slots wanted: every slot holding rows in the default partition, and now .. now + premake.
        let mut wanted: Vec<(TimestampWithTimeZone, TimestampWithTimeZone)> = Vec::new();
        let stray: Vec<TimestampWithTimeZone> = Spi::connect(
            |c| -> Result<Vec<TimestampWithTimeZone>> {
                let mut v = Vec::new();
                for r in c.select("SELECT DISTINCT pg_catalog.date_trunc('hour', changed_at) FROM audit.log_default", None, &[])? {
                if let Some(t) = r.get::<TimestampWithTimeZone>(1)? {
                    v.push(t);
                }
            }
                Ok(v)
            },
        )?;
        for t in stray {
            wanted.push(slot_of(t, &interval)?);
        }
        let (mut a, mut b) = slot_of(as_of, &interval)?;
        for _ in 0..=premake {
            wanted.push((a, b));
            a = b;
            b = add_interval(a, &interval)?;
        }
        wanted.sort_by_key(|w| pg_sys::TimestampTz::from(w.0));
        wanted.dedup_by_key(|w| pg_sys::TimestampTz::from(w.0));
        let existing = partitions()?;
        wanted.retain(|(from, to)| !existing.iter().any(|p| p.from < *to && *from < p.to));
        let mut expired = Vec::new();
        let mut kept = Vec::new();
        if let Some(ret) = settings::retention() {
            let cutoff = Spi::get_one_with_args::<TimestampWithTimeZone>(
                "SELECT $1 OPERATOR(pg_catalog.-) $2::pg_catalog.interval",
                &[as_of.into(), ret.into()],
            )?
            .ok_or(AuditError::Internal("retention arithmetic".into()))?;
            let (_, sealed_through, _) = crate::chain::seal::chain_head()?;
            let current = crate::version::schema_is_current()?;
            for p in existing.into_iter().filter(|p| p.to <= cutoff) {
                if !current {
                    kept.push(json!({"partition": p.name, "why": "run ALTER EXTENSION audit_ext UPDATE first"}));
                    continue;
                }
                let max_id = Spi::get_one::<i64>(&format!(
                    "SELECT pg_catalog.max(id) FROM audit.{}",
                    p.name
                ))?;
                if max_id.is_some_and(|m| m > sealed_through) {
                    kept.push(json!({"partition": p.name, "why": "has rows not sealed yet: run audit.seal() first"}));
                    continue;
                }
                expired.push(p);
            }
        }

        // Then the locks that work needs, parent first: removing partitions needs
        // the parent alone, adding them needs the default partition too.
        if !wanted.is_empty() || !expired.is_empty() {
            Spi::run(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))?;
            if !expired.is_empty() {
                // The chain before the tables, as the sealer takes them (it reads audit.log
                // while it holds the chain): retention appends a record to it.
                crate::chain::seal::lock_chain()?;
            }
            let parent =
                if expired.is_empty() { "SHARE UPDATE EXCLUSIVE" } else { "ACCESS EXCLUSIVE" };
            lock_in_order(parent, !wanted.is_empty())?;
        }
        let mut created = Vec::new();
        let mut moved = 0i64;
        // Another maintain() may have made or removed some of them while we waited for the locks.
        let existing = partitions()?;
        for (from, to) in
            wanted.into_iter().filter(|(f, t)| !existing.iter().any(|p| p.from < *t && *f < p.to))
        {
            let (name, n) = create_partition(from, to)?;
            moved += n;
            created.push(name);
        }
        let mut removed = Vec::new();
        for p in expired.into_iter().filter(|p| existing.iter().any(|e| e.name == p.name)) {
            crate::chain::prune::record(&p.name)?;
            Spi::run_with_args(
                "INSERT INTO audit.horizon (id, horizon) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET horizon = GREATEST(audit.horizon.horizon, EXCLUDED.horizon)",
                &[p.to.into()],
            )?;
            Spi::run("SET LOCAL audit.allow_drop = on")?;
            if settings::retention_detach() {
                let have = Spi::get_one::<bool>(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname OPERATOR(pg_catalog.=) 'audit_archive')",
                )?;
                if have != Some(true) {
                    Spi::run("CREATE SCHEMA audit_archive")?;
                    Spi::run("REVOKE ALL ON SCHEMA audit_archive FROM PUBLIC")?;
                }
                Spi::run(&format!("ALTER TABLE audit.log DETACH PARTITION audit.{}", p.name))?;
                Spi::run(&format!("ALTER TABLE audit.{} SET SCHEMA audit_archive", p.name))?;
                removed.push(json!({"partition": p.name, "action": "detached"}));
            } else {
                Spi::run(&format!("DROP TABLE audit.{}", p.name))?;
                removed.push(json!({"partition": p.name, "action": "dropped"}));
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
