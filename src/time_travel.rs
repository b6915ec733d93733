//! Time travel: audit.state_at, audit.table_at and audit.history (and the
//! table addressing that audit.undo shares).
//!
//! The state of a row at time `at` is read from the first change after `at`
//! (one index probe): INSERT means it did not exist, UPDATE means
//! `new_values || old_values`, DELETE means `old_values`, a SNAPSHOT
//! (audit.baseline) means `new_values`; with no later change it is the live
//! row. An UPDATE that stored only its changed columns (capture 'changes')
//! makes the walk go on to the next change, as crate::image says. Reads of the log run as the extension owner; reads of live rows and
//! undo's writes run as the caller, so table privileges apply and no user code
//! (casts, output functions) runs with the owner's rights.

use pgrx::prelude::*;
use pgrx::PgRelation;

use crate::db_text::{to_rust, DbJson, DbText};
use crate::live_rows::{BatchMemory, Cursor, Encoder};
use serde_json::Value;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::PgOid;

use crate::errors::{AuditError, OrRaise, Result};
use crate::image::{self, Change};
use crate::privilege::{as_extension_owner, require_select};
use crate::quote::{ident as quote_ident, literal as quote_literal};

thread_local! {
    /// Kept plans by query text: a state_at call runs a handful of small queries,
    /// and planning them against every partition of audit.log cost more than running them.
    static PLANS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Queries whose text depends on the table stay bounded by this many kept plans.
const MAX_PLANS: usize = 256;

/// Live rows fetched at a time; what one fetch allocates is freed before the next.
const LIVE_FETCH: i64 = 1_000;

/// Runs `sql` through a plan kept for the backend's life (PostgreSQL re-plans it
/// when a table it uses changes). Privileges are checked at each execution, as
/// the user current then.
fn select_kept<'c>(
    c: &SpiClient<'c>,
    sql: &str,
    args: &[DatumWithOid],
) -> Result<SpiTupleTable<'c>> {
    let plan = match PLANS.with(|m| m.borrow().get(sql).cloned()) {
        Some(p) => p,
        None => {
            let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
            let p = Rc::new(c.prepare(sql, &types)?.keep());
            PLANS.with(|m| {
                let mut m = m.borrow_mut();
                if m.len() >= MAX_PLANS {
                    m.clear();
                }
                m.insert(sql.to_string(), p.clone());
            });
            p
        }
    };
    Ok(c.select(&*plan, None, args)?)
}

/// What we need to know about a tracked table to address its rows.
pub(crate) struct Table {
    relid: pg_sys::Oid,
    pub(crate) qname: String,
    /// (column, SQL type) of the row key, in key order.
    key: Vec<(String, String)>,
    /// (schema, table, since) of every name it has had, oldest first; `since` is an
    /// ISO 8601 UTC timestamp, or None for "as far back as the log goes".
    names: Vec<(String, String, Option<String>)>,
    pub(crate) exclude: Vec<String>,
    pub(crate) redact: Vec<String>,
    earliest: TimestampWithTimeZone,
}

impl Table {
    pub(crate) fn load(rel: &PgRelation) -> Result<Table> {
        let relid = rel.oid();
        let rn = crate::db_text::rel_names(rel)?;
        let qname = rn.qualified();
        require_select(relid, &qname)?;
        // One switch to the owner for both reads of audit_ext's own tables.
        type Tracked = (Vec<String>, Vec<String>, TimestampWithTimeZone);
        type Names = Vec<(String, String, Option<String>)>;
        let (found, mut names) = as_extension_owner(|| {
            Spi::connect(|c| -> Result<(Option<Tracked>, Names)> {
                let mut rows = select_kept(
                    c,
                    "SELECT t.exclude, t.redact,
                            GREATEST(t.tracked_since, (SELECT h.horizon FROM audit.horizon h))
                       FROM audit.tracked t WHERE t.relid OPERATOR(pg_catalog.=) $1",
                    &[relid.into()],
                )?;
                let found = match rows.next() {
                    None => None,
                    Some(r) => Some((
                        r.get::<Vec<String>>(1)?.unwrap_or_default(),
                        r.get::<Vec<String>>(2)?.unwrap_or_default(),
                        r.get::<TimestampWithTimeZone>(3)?
                            .ok_or(AuditError::Internal("no tracking start".into()))?,
                    )),
                };
                let mut names = Vec::new();
                for r in select_kept(
                    c,
                    "SELECT schema_name, table_name,
                            CASE WHEN valid_from OPERATOR(pg_catalog.=) '-infinity' THEN NULL
                                 ELSE pg_catalog.to_char(valid_from AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') END
                       FROM audit.table_names WHERE relid OPERATOR(pg_catalog.=) $1 ORDER BY valid_from",
                    &[relid.into()],
                )? {
                    // Names it had before, as identifiers too: a rename to ASCII keeps the old ones.
                    let name = |i| -> Result<String> {
                        crate::db_text::ident_text(&r.get::<DbText>(i)?.unwrap_or_default())
                    };
                    names.push((name(1)?, name(2)?, r.get::<String>(3)?));
                }
                Ok((found, names))
            })
        })?;
        let (exclude, redact, earliest) =
            found.ok_or_else(|| AuditError::NotTracked { table: qname.clone() })?;
        let current = (rn.schema, rn.table);
        if names.last().is_none_or(|(s, n, _)| (s, n) != (&current.0, &current.1)) {
            // Renamed while audit_ext could not see it (event triggers off): the current name too.
            names.push((current.0, current.1, None));
        }
        // SAFETY: rel is open.
        let key = unsafe { crate::row_key::columns(rel.as_ptr()) }
            .into_iter()
            .map(|k| Ok((crate::db_text::ident(k.name.to_bytes())?, k.sql_type()?)))
            .collect::<Result<_>>()?;
        Ok(Table { relid, qname, key, names, exclude, redact, earliest })
    }

    /// SQL predicate on audit.log selecting this table's rows: under each name it
    /// had, for the time it had it (bounds inclusive: a row has one name, and a
    /// rename's own transaction has one timestamp).
    pub(crate) fn log_filter(&self) -> String {
        let parts: Vec<String> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, (schema, table, since))| {
                let mut p = format!(
                    "(table_name OPERATOR(pg_catalog.=) {} AND schema_name OPERATOR(pg_catalog.=) {}",
                    quote_literal(table),
                    quote_literal(schema)
                );
                if let Some(f) = since {
                    p.push_str(&format!(" AND changed_at OPERATOR(pg_catalog.>=) {}::pg_catalog.timestamptz", quote_literal(f)));
                }
                if let Some((_, _, Some(next))) = self.names.get(i + 1) {
                    p.push_str(&format!(" AND changed_at OPERATOR(pg_catalog.<=) {}::pg_catalog.timestamptz", quote_literal(next)));
                }
                p.push(')');
                p
            })
            .collect();
        format!("({})", parts.join(" OR "))
    }

    pub(crate) fn need_key(&self) -> Result<()> {
        if self.key.is_empty() {
            return Err(AuditError::NotTrackable {
                table: self.qname.clone(),
                why: "it has no primary key or replica identity index, so its rows have no row_id",
            });
        }
        Ok(())
    }

    fn check_at(&self, at: TimestampWithTimeZone) -> Result<()> {
        if at < self.earliest {
            return Err(AuditError::TooEarly(format!(
                "{} has no audit history before {}: that is the earliest time audit_ext can answer for",
                self.qname, self.earliest
            )));
        }
        Ok(())
    }

    /// SQL predicate matching the row whose row_id is the text parameter `$n`, on alias `t`.
    pub(crate) fn key_predicate(&self, n: usize) -> String {
        self.key_predicate_on("t", n)
    }

    /// As [`Self::key_predicate`], on the (quoted) alias `alias`.
    fn key_predicate_on(&self, alias: &str, n: usize) -> String {
        if self.key.len() == 1 {
            let (col, ty) = &self.key[0];
            return format!(
                "{alias}.{} OPERATOR(pg_catalog.=) CAST(${n}::pg_catalog.text AS {ty})",
                quote_ident(col)
            );
        }
        self.key
            .iter()
            .enumerate()
            .map(|(i, (col, ty))| {
                // jsonb_to_record is the inverse of to_jsonb (a JSON array becomes a
                // PostgreSQL array, a string goes through the type's input function);
                // the subquery is constant, so the key's index still serves.
                format!(
                    "{alias}.{} OPERATOR(pg_catalog.=) (SELECT x.v FROM pg_catalog.jsonb_to_record(pg_catalog.jsonb_build_object('v', \
                     ${n}::pg_catalog.jsonb OPERATOR(pg_catalog.->) {i})) AS x(v {ty}))",
                    quote_ident(col)
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// SQL expression giving a live row's row_id, as the trigger writes it, on
    /// the (quoted) alias `alias`: for a reader that sorts or joins on it
    /// (verify_table); live rows read here get theirs from the trigger's rule.
    pub(crate) fn key_expr_on(&self, alias: &str) -> String {
        if self.key.len() == 1 {
            // The type's output function, as the trigger uses (bool::text would say 'true').
            return format!("pg_catalog.format('%s', {alias}.{})", quote_ident(&self.key[0].0));
        }
        let cols: Vec<String> =
            self.key.iter().map(|(c, _)| format!("{alias}.{}", quote_ident(c))).collect();
        format!("pg_catalog.jsonb_build_array({})::pg_catalog.text", cols.join(", "))
    }

    /// Reads live rows as the caller (output functions and casts are user
    /// code): the one whose key is `row_id`, or every one. Each comes as its
    /// key and its image exactly as the capture trigger logs them
    /// (crate::live_rows): the log's own rule, not a second one that could
    /// drift from it.
    fn live_rows(&self, row_id: Option<&str>) -> Result<Vec<(String, Value)>> {
        // SAFETY: the caller's regclass argument has the table open and locked;
        // this takes the same lock again.
        let rel = unsafe {
            PgRelation::with_lock(self.relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE)
        };
        let enc = Encoder::new(&rel)?;
        let filter = match row_id {
            Some(_) => format!("WHERE {}", self.key_predicate_on(&enc.alias, 1)),
            None => String::new(),
        };
        let q = format!("SELECT {} FROM {} {} {filter}", enc.columns(), self.qname, enc.alias);
        let args: Vec<(pg_sys::Oid, Option<pg_sys::Datum>)> = row_id
            .map(|k| (pg_sys::TEXTOID, DbText::from_rust(k).into_datum()))
            .into_iter()
            .collect();
        Spi::connect(|_| -> Result<Vec<(String, Value)>> {
            let mut cursor = Cursor::open(&q, &args)?;
            let mem = BatchMemory::new();
            let mut out = Vec::new();
            cursor.each(LIVE_FETCH, &mem, &mut |values, nulls| {
                // SAFETY: a row of enc.columns(), valid for this call.
                unsafe {
                    enc.with_row(values, nulls, |key, image| {
                        let key = key.ok_or_else(|| {
                            AuditError::Internal(format!("a row of {} has a NULL key", self.qname))
                        })?;
                        // SAFETY: a jsonb image, valid for the call; read into a Value.
                        let image = DbJson::from_datum(image, false).map(|j| j.0);
                        out.push((to_rust(&key).into_owned(), image.unwrap_or(Value::Null)));
                        Ok(true)
                    })
                }
            })?;
            Ok(out)
        })
    }

    fn truncated(&self, at: TimestampWithTimeZone) -> AuditError {
        AuditError::TruncatedSince { table: self.qname.clone(), at: at.to_string() }
    }
}

/// The first TRUNCATE of the table after `at` (it logs no rows: what it removed
/// is unknown from then on).
fn first_truncate_after(
    c: &SpiClient<'_>,
    t: &Table,
    at: TimestampWithTimeZone,
) -> Result<Option<TimestampWithTimeZone>> {
    Ok(select_kept(
        c,
        &format!(
            "SELECT changed_at FROM audit.log
              WHERE {} AND row_id IS NULL AND changed_at OPERATOR(pg_catalog.>) $1
                AND operation OPERATOR(pg_catalog.=) 'TRUNCATE'
              ORDER BY changed_at, id LIMIT 1",
            t.log_filter()
        ),
        &[at.into()],
    )?
    .next()
    .and_then(|r| r.get::<TimestampWithTimeZone>(1).ok().flatten()))
}

/// Changes fetched at a time while walking forward over one row's changes.
const WALK_PAGE: i64 = 64;

/// A walk over one row's changes, each with its time.
type Walk = Vec<(Change, TimestampWithTimeZone)>;

/// The state of `row_id` at `at`: the state before its first change after `at`
/// (crate::image walks on past partial changes), or the live row.
fn state_at_moment(t: &Table, row_id: &str, at: TimestampWithTimeZone) -> Result<Option<Value>> {
    let cols =
        "operation, old_values, new_values, changed_fields, old_row_id IS NOT NULL, changed_at, id";
    let (walk, truncated) = as_extension_owner(|| {
        Spi::connect(|c| -> Result<(Walk, Option<TimestampWithTimeZone>)> {
            let trunc = first_truncate_after(c, t, at)?;
            // The first move away from the key ends the walk: that row is always whole.
            let away = select_kept(
                c,
                &format!(
                    "SELECT {cols} FROM audit.log
                      WHERE {names} AND old_row_id OPERATOR(pg_catalog.=) $1
                        AND changed_at OPERATOR(pg_catalog.>) $2
                      ORDER BY changed_at, id LIMIT 1",
                    names = t.log_filter()
                ),
                &[DbText::from_rust(row_id).into(), at.into()],
            )?
            .next()
            .map(|r| -> Result<_> {
                Ok((
                    Change::from_row(&r, 1, true)?,
                    r.get::<TimestampWithTimeZone>(6)?.unwrap_or(at),
                    r.get::<i64>(7)?.unwrap_or(0),
                ))
            })
            .transpose()?;
            let page = format!(
                "SELECT {cols} FROM audit.log
                  WHERE {names} AND row_id OPERATOR(pg_catalog.=) $1
                    AND changed_at OPERATOR(pg_catalog.>=) $2
                    AND (changed_at OPERATOR(pg_catalog.>) $2 OR id OPERATOR(pg_catalog.>) $3)
                  ORDER BY changed_at, id LIMIT {WALK_PAGE}",
                names = t.log_filter()
            );
            // The walk: changes up to the first complete one (crate::image).
            let mut walk = Vec::new();
            let (mut after, mut after_id) = (at, i64::MAX); // first page: strictly after `at`
            loop {
                let mut n = 0;
                let mut done = false;
                for r in select_kept(
                    c,
                    &page,
                    &[DbText::from_rust(row_id).into(), after.into(), after_id.into()],
                )? {
                    n += 1;
                    let when = r.get::<TimestampWithTimeZone>(6)?.unwrap_or(at);
                    let id = r.get::<i64>(7)?.unwrap_or(0);
                    (after, after_id) = (when, id);
                    if away.as_ref().is_some_and(|(_, w, i)| (*w, *i) < (when, id)) {
                        done = true;
                        break;
                    }
                    let ch = Change::from_row(&r, 1, false)?;
                    let partial = ch.partial();
                    walk.push((ch, when));
                    if !partial {
                        done = true;
                        break;
                    }
                }
                if done || n < WALK_PAGE {
                    break;
                }
            }
            if walk.last().is_none_or(|(ch, _)| ch.partial()) {
                if let Some((ch, when, _)) = away {
                    walk.push((ch, when));
                }
            }
            Ok((walk, trunc))
        })
    })?;
    // A TRUNCATE (which logs no rows) inside the walk, or before the live row it
    // would end at, leaves the state unknown.
    let complete = walk.last().is_some_and(|(ch, _)| !ch.partial());
    if let Some(tr) = truncated {
        if walk.iter().any(|(_, when)| *when > tr) || !complete {
            // The walk forward crosses the TRUNCATE: walk back from `at` instead.
            return state_after_changes_until(t, row_id, at)?.ok_or_else(|| t.truncated(tr));
        }
    }
    let before = image::before_first(walk.into_iter().map(|(ch, _)| ch));
    if complete {
        return Ok(image::resolve(before, || None));
    }
    let live = t.live_rows(Some(row_id))?;
    Ok(image::resolve(before, || live.into_iter().next().map(|(_, v)| v)))
}

/// Changes read going back from a moment: past this many without a whole image,
/// the state is left unknown.
const BACK_WALK: i64 = 1_024;

/// The state after the last change of `row_id` up to `at`, walking back to a
/// whole image (crate::image); None if none is found.
fn state_after_changes_until(
    t: &Table,
    row_id: &str,
    at: TimestampWithTimeZone,
) -> Result<Option<Option<Value>>> {
    let q = format!(
        "SELECT operation, old_values, new_values, changed_fields, moved, as_old FROM (
           (SELECT operation, old_values, new_values, changed_fields, old_row_id IS NOT NULL AS moved,
                   false AS as_old, changed_at, id
              FROM audit.log WHERE {names} AND row_id OPERATOR(pg_catalog.=) $1
               AND changed_at OPERATOR(pg_catalog.<=) $2 ORDER BY changed_at DESC, id DESC LIMIT {BACK_WALK})
           UNION ALL
           (SELECT operation, old_values, new_values, changed_fields, true, true, changed_at, id
              FROM audit.log WHERE {names} AND old_row_id OPERATOR(pg_catalog.=) $1
               AND changed_at OPERATOR(pg_catalog.<=) $2 ORDER BY changed_at DESC, id DESC LIMIT 1)
         ) ch ORDER BY changed_at DESC, id DESC",
        names = t.log_filter()
    );
    let changes = as_extension_owner(|| {
        Spi::connect(|c| -> Result<Vec<Change>> {
            let mut v = Vec::new();
            for r in select_kept(c, &q, &[DbText::from_rust(row_id).into(), at.into()])? {
                let as_old = r.get::<bool>(6)?.unwrap_or(false);
                v.push(Change::from_row(&r, 1, as_old)?);
            }
            Ok(v)
        })
    })?;
    Ok(image::after_last(changes))
}

fn state_at_impl(
    rel: Option<PgRelation>,
    row_id: Option<DbText>,
    at: Option<TimestampWithTimeZone>,
) -> Result<Option<Value>> {
    let rel = rel.ok_or(AuditError::NullArgument("tbl"))?;
    let row_id = row_id.ok_or(AuditError::NullArgument("row_id"))?.0;
    let at = at.ok_or(AuditError::NullArgument("at"))?;
    let t = Table::load(&rel)?;
    t.need_key()?;
    t.check_at(at)?;
    state_at_moment(&t, &row_id, at)
}

/// What a reading function returned is the table's data: a read of it, for
/// access auditing (its own reads inside are quiet).
fn noted(relid: Option<pg_sys::Oid>, function: &str, rows: i64) {
    if let Some(relid) = relid {
        crate::access::note_function_read(relid, function, rows);
    }
}

#[pg_extern(stable, parallel_safe)]
fn state_at(
    tbl: Option<PgRelation>,
    row_id: Option<DbText>,
    at: Option<TimestampWithTimeZone>,
) -> Option<DbJson> {
    let relid = tbl.as_ref().map(|r| r.oid());
    let _q = crate::quiet::Quiet::enter();
    let state = state_at_impl(tbl, row_id, at).or_raise();
    noted(relid, "audit.state_at", state.is_some() as i64);
    state.map(DbJson)
}

fn table_at_impl(rel: Option<PgRelation>, at: Option<TimestampWithTimeZone>) -> Result<Vec<Value>> {
    let rel = rel.ok_or(AuditError::NullArgument("tbl"))?;
    let at = at.ok_or(AuditError::NullArgument("at"))?;
    let t = Table::load(&rel)?;
    t.need_key()?;
    t.check_at(at)?;
    let truncated = as_extension_owner(|| Spi::connect(|c| first_truncate_after(c, &t, at)))?;
    if let Some(tr) = truncated {
        return Err(t.truncated(tr));
    }
    // Each key's changes after `at`, up to its first complete one (crate::image).
    let q = format!(
        "WITH ch AS (
            SELECT row_id AS k, false AS as_old, old_row_id IS NOT NULL AS moved_in, operation,
                   old_values, new_values, changed_fields, changed_at, id
              FROM audit.log
             WHERE {names} AND changed_at OPERATOR(pg_catalog.>) $1 AND row_id IS NOT NULL
            UNION ALL
            SELECT old_row_id, true, false, operation, old_values, new_values, changed_fields, changed_at, id
              FROM audit.log
             WHERE {names} AND changed_at OPERATOR(pg_catalog.>) $1 AND old_row_id IS NOT NULL
         ), marked AS (
            SELECT ch.*, pg_catalog.count(*) FILTER (WHERE NOT COALESCE({partial}, false)) OVER (
                     PARTITION BY k ORDER BY changed_at, id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
                   ) AS completes_before
              FROM ch
         )
         SELECT k, operation, old_values, new_values, changed_fields, moved_in, as_old
           FROM marked WHERE completes_before OPERATOR(pg_catalog.=) 0
          ORDER BY k, changed_at, id",
        names = t.log_filter(),
        partial = image::partial_sql("as_old OR moved_in")
    );
    // Rows changed after `at` come from the log (as the owner), the rest from the table (as the caller).
    let mut known = std::collections::HashSet::new();
    let mut overlays = HashMap::new();
    let mut out = Vec::new();
    as_extension_owner(|| {
        Spi::connect(|c| -> Result<()> {
            let mut key: Option<String> = None;
            let mut run: Vec<Change> = Vec::new();
            let mut finish = |k: String, run: Vec<Change>, out: &mut Vec<Value>| {
                match image::before_first(run) {
                    image::Before::Known(v) => {
                        known.insert(k);
                        out.extend(v);
                    }
                    image::Before::Overlay(m) => {
                        overlays.insert(k, m);
                    }
                }
            };
            for r in c.select(&q, None, &[at.into()])? {
                let k = r.get::<DbText>(1)?.unwrap_or_default().0;
                let as_old = r.get::<bool>(7)?.unwrap_or(false);
                if key.as_ref() != Some(&k) {
                    if let Some(prev) = key.replace(k.clone()) {
                        finish(prev, std::mem::take(&mut run), &mut out);
                    }
                }
                run.push(Change::from_row(&r, 2, as_old)?);
            }
            if let Some(prev) = key {
                finish(prev, run, &mut out);
            }
            Ok(())
        })
    })?;
    for (k, v) in t.live_rows(None)? {
        if known.contains(&k) {
            continue;
        }
        match overlays.remove(&k) {
            Some(m) => out.extend(image::resolve(image::Before::Overlay(m), || Some(v))),
            None => out.push(v),
        }
    }
    Ok(out)
}

#[pg_extern(stable, parallel_safe)]
fn table_at(
    tbl: Option<PgRelation>,
    at: Option<TimestampWithTimeZone>,
) -> SetOfIterator<'static, DbJson> {
    let relid = tbl.as_ref().map(|r| r.oid());
    let _q = crate::quiet::Quiet::enter();
    let rows = table_at_impl(tbl, at).or_raise();
    noted(relid, "audit.table_at", rows.len() as i64);
    SetOfIterator::new(rows.into_iter().map(DbJson))
}

/// A row's history, each log row made into `T` by `row` (the pg_extern's own
/// column list, so that the columns are written down once), with the row's
/// state after it: NULL once it is deleted or has left the key.
fn history_impl<T>(
    rel: Option<PgRelation>,
    row_id: Option<DbText>,
    row: impl Fn(&pgrx::spi::SpiHeapTupleData) -> Result<T>,
) -> Result<Vec<(T, Option<Value>)>> {
    let rel = rel.ok_or(AuditError::NullArgument("tbl"))?;
    let row_id = row_id.ok_or(AuditError::NullArgument("row_id"))?.0;
    let t = Table::load(&rel)?;
    t.need_key()?;
    let (rows, changes, truncated_after_last) = as_extension_owner(|| {
        Spi::connect(|c| -> Result<(Vec<T>, Vec<Change>, bool)> {
            let rows = c.select(
                &format!(
                    "SELECT id, changed_at, txid, operation, changed_by, changed_fields, old_values, new_values,
                            row_id OPERATOR(pg_catalog.<>) $1, old_row_id IS NOT NULL
                       FROM audit.log
                      WHERE {} AND (row_id OPERATOR(pg_catalog.=) $1 OR old_row_id OPERATOR(pg_catalog.=) $1)
                      ORDER BY changed_at, id",
                    t.log_filter()
                ),
                None,
                &[DbText(row_id.clone()).into()],
            )?;
            let (mut out, mut changes) = (Vec::new(), Vec::new());
            let mut last_at = None;
            for r in rows {
                out.push(row(&r)?);
                let as_old = r.get::<bool>(9)?.unwrap_or(false);
                changes.push(Change {
                    op: r.get::<DbText>(4)?.unwrap_or_default().0,
                    old: r.get::<DbJson>(7)?.map(|j| j.0),
                    new: r.get::<DbJson>(8)?.map(|j| j.0),
                    fields: crate::db_text::strings(r.get::<Vec<DbText>>(6)?),
                    as_old_key: as_old,
                    key_moved_in: !as_old && r.get::<bool>(10)?.unwrap_or(false),
                });
                last_at = r.get::<TimestampWithTimeZone>(2)?;
            }
            let truncated = match last_at {
                Some(at) => first_truncate_after(c, &t, at)?.is_some(),
                None => false,
            };
            Ok((out, changes, truncated))
        })
    })?;
    // States forward from each complete change; a run of partial ones before the
    // first complete change (a row older than tracking) is known backward from the
    // first complete change after it, or from the live row.
    let mut states: Vec<Option<Value>> = Vec::with_capacity(changes.len());
    let mut running: Option<Option<Value>> = None; // None: not known going forward
    for (i, ch) in changes.iter().enumerate() {
        running = image::step(running, ch);
        let state = match &running {
            Some(v) => v.clone(),
            None => {
                // The state after change i is the state before change i+1.
                let before = image::before_first(changes[i + 1..].iter().cloned());
                if matches!(before, image::Before::Known(_)) || truncated_after_last {
                    image::resolve(before, || None)
                } else {
                    let live = t.live_rows(Some(&row_id))?;
                    image::resolve(before, || live.into_iter().next().map(|(_, v)| v))
                }
            }
        };
        states.push(state);
    }
    Ok(rows.into_iter().zip(states).collect())
}

#[allow(clippy::type_complexity)] // the result's columns, as pgrx spells them
#[pg_extern(stable, parallel_safe)]
fn history(
    tbl: Option<PgRelation>,
    row_id: Option<DbText>,
) -> TableIterator<
    'static,
    (
        name!(id, i64),
        name!(changed_at, TimestampWithTimeZone),
        name!(txid, i64),
        name!(operation, DbText),
        name!(changed_by, DbText),
        name!(changed_fields, Option<Vec<DbText>>),
        name!(old_values, Option<DbJson>),
        name!(new_values, Option<DbJson>),
        name!(state, Option<DbJson>),
    ),
> {
    let relid = tbl.as_ref().map(|r| r.oid());
    let _q = crate::quiet::Quiet::enter();
    let rows = history_impl(tbl, row_id, |r| {
        Ok((
            r.get(1)?.unwrap_or_default(),
            r.get(2)?.ok_or(AuditError::Internal("null changed_at".into()))?,
            r.get(3)?.unwrap_or_default(),
            r.get(4)?.unwrap_or_default(),
            r.get(5)?.unwrap_or_default(),
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
        ))
    });
    let rows = rows.or_raise();
    noted(relid, "audit.history", rows.len() as i64);
    TableIterator::new(
        rows.into_iter()
            .map(|((a, b, c, d, e, f, g, h), state)| (a, b, c, d, e, f, g, h, state.map(DbJson))),
    )
}
