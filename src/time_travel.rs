//! Time travel: audit.state_at, audit.table_at and audit.history (and the
//! table addressing that audit.undo shares).
//!
//! The state of a row at time `at` is read from the first change after `at`
//! (one index probe): INSERT means it did not exist, UPDATE means
//! `new_values || old_values`, DELETE means `old_values`, a SNAPSHOT
//! (audit.baseline) means `new_values`; with no later change it is the live
//! row. Reads of the log run as the extension owner; reads of live rows and
//! undo's writes run as the caller, so table privileges apply and no user code
//! (casts, output functions) runs with the owner's rights.

use pgrx::prelude::*;
use pgrx::{JsonB, PgRelation};
use serde_json::Value;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::PgOid;

use crate::errors::{AuditError, OrRaise, Result};
use crate::privilege::{as_extension_owner, require_select};
use crate::quote::{ident as quote_ident, literal as quote_literal};

thread_local! {
    /// Kept plans by query text: a state_at call runs a handful of small queries,
    /// and planning them against every partition of audit.log cost more than running them.
    static PLANS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Queries whose text depends on the table stay bounded by this many kept plans.
const MAX_PLANS: usize = 256;

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
        let qname = format!("{}.{}", quote_ident(rel.namespace()), quote_ident(rel.name()));
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
                    names.push((r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?.unwrap_or_default(), r.get::<String>(3)?));
                }
                Ok((found, names))
            })
        })?;
        let (exclude, redact, earliest) =
            found.ok_or_else(|| AuditError::NotTracked { table: qname.clone() })?;
        let current = (rel.namespace().to_string(), rel.name().to_string());
        if names.last().is_none_or(|(s, n, _)| (s, n) != (&current.0, &current.1)) {
            // Renamed while audit_ext could not see it (event triggers off): the current name too.
            names.push((current.0, current.1, None));
        }
        // SAFETY: rel is open.
        let key = unsafe { crate::row_key::columns(rel.as_ptr()) }
            .into_iter()
            .map(|k| (k.name.to_string_lossy().into_owned(), k.sql_type()))
            .collect();
        Ok(Table { qname, key, names, exclude, redact, earliest })
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
        if self.key.len() == 1 {
            let (col, ty) = &self.key[0];
            return format!(
                "t.{} OPERATOR(pg_catalog.=) CAST(${n}::pg_catalog.text AS {ty})",
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
                    "t.{} OPERATOR(pg_catalog.=) (SELECT x.v FROM pg_catalog.jsonb_to_record(pg_catalog.jsonb_build_object('v', \
                     ${n}::pg_catalog.jsonb OPERATOR(pg_catalog.->) {i})) AS x(v {ty}))",
                    quote_ident(col)
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// SQL expression giving a live row's row_id, as the trigger writes it, on alias `t`.
    fn key_expr(&self) -> String {
        self.key_expr_on("t")
    }

    /// As [`Self::key_expr`], on the (quoted) alias `alias`.
    pub(crate) fn key_expr_on(&self, alias: &str) -> String {
        if self.key.len() == 1 {
            // The type's output function, as the trigger uses (bool::text would say 'true').
            return format!("pg_catalog.format('%s', {alias}.{})", quote_ident(&self.key[0].0));
        }
        let cols: Vec<String> =
            self.key.iter().map(|(c, _)| format!("{alias}.{}", quote_ident(c))).collect();
        format!("pg_catalog.jsonb_build_array({})::pg_catalog.text", cols.join(", "))
    }

    /// Select list for a live row on alias `t`: its row_id, `to_jsonb(t)` without
    /// excluded and redacted columns, and the redacted columns' output text.
    fn live_select(&self) -> String {
        let mut e = "pg_catalog.to_jsonb(t.*)".to_string(); // t.*: a column may be named t
        let hidden: Vec<String> =
            self.exclude.iter().chain(&self.redact).map(|c| quote_literal(c)).collect();
        if !hidden.is_empty() {
            e = format!(
                "({e} OPERATOR(pg_catalog.-) ARRAY[{}]::pg_catalog.text[])",
                hidden.join(", ")
            );
        }
        let red: Vec<String> = self
            .redact
            .iter()
            .map(|c| {
                format!(
                    "CASE WHEN t.{q} IS NULL THEN NULL ELSE pg_catalog.format('%s', t.{q}) END",
                    q = quote_ident(c)
                )
            })
            .collect();
        let arr = if red.is_empty() {
            "NULL::pg_catalog.text[]".to_string()
        } else {
            format!("ARRAY[{}]::pg_catalog.text[]", red.join(", "))
        };
        format!("{}, {e}, {arr}", self.key_expr())
    }

    /// Reads live rows as the caller (`where_` filters alias `t`), shaped as the log stores them.
    fn live_rows(
        &self,
        where_: &str,
        args: &[pgrx::datum::DatumWithOid],
    ) -> Result<Vec<(String, Value)>> {
        let key = if self.redact.is_empty() {
            None
        } else {
            Some(crate::secret::key(&crate::ext::ext_state()?)?)
        };
        let q = format!("SELECT {} FROM {} t {where_}", self.live_select(), self.qname);
        Spi::connect(|c| -> Result<Vec<(String, Value)>> {
            let mut out = Vec::new();
            for r in select_kept(c, &q, args)? {
                let k = r.get::<String>(1)?.unwrap_or_default();
                let mut v = r.get::<JsonB>(2)?.map(|j| j.0).unwrap_or(Value::Null);
                let red = r.get::<Vec<Option<String>>>(3)?.unwrap_or_default();
                if let (Value::Object(m), Some(key)) = (&mut v, key.as_deref()) {
                    for (col, text) in self.redact.iter().zip(red) {
                        let marker = text.map(|t| {
                            Value::String(crate::chain::hash::redaction_marker(key, t.as_bytes()))
                        });
                        m.insert(col.clone(), marker.unwrap_or(Value::Null));
                    }
                }
                out.push((k, v));
            }
            Ok(out)
        })
    }

    fn truncated(&self, at: TimestampWithTimeZone) -> AuditError {
        AuditError::TruncatedSince { table: self.qname.clone(), at: at.to_string() }
    }
}

/// The state implied by the first change after a moment (see the module docs).
fn state_from_first_change(
    op: &str,
    as_old_key: bool,
    key_moved_in: bool,
    old: Option<Value>,
    new: Option<Value>,
) -> Option<Value> {
    let merge = |new: Option<Value>, old: Option<Value>| {
        let mut base = match new {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        if let Some(Value::Object(o)) = old {
            base.extend(o);
        }
        Some(Value::Object(base))
    };
    if as_old_key {
        return merge(new, old); // the row left this key: before that change it had it
    }
    match op {
        "INSERT" => None,
        "UPDATE" if key_moved_in => None, // the key arrived with this change
        "UPDATE" => merge(new, old),
        "DELETE" => old,
        // audit.baseline's record of the row as it was then (and since tracking began).
        "SNAPSHOT" => new,
        _ => None,
    }
}

struct Change {
    op: String,
    old: Option<Value>,
    new: Option<Value>,
    as_old_key: bool,
    key_moved_in: bool,
    changed_at: TimestampWithTimeZone,
}

/// The first change after `at` touching `row_id` (under it, or moving away from it),
/// and the first TRUNCATE after `at`.
fn first_change_after(
    t: &Table,
    row_id: &str,
    at: TimestampWithTimeZone,
) -> Result<(Option<Change>, Option<TimestampWithTimeZone>)> {
    as_extension_owner(|| {
        Spi::connect(|c| -> Result<(Option<Change>, Option<TimestampWithTimeZone>)> {
            let mut best: Option<(TimestampWithTimeZone, i64, Change)> = None;
            for (col, as_old) in [("row_id", false), ("old_row_id", true)] {
                let q = format!(
                    "SELECT operation, old_values, new_values, old_row_id IS NOT NULL, changed_at, id
                       FROM audit.log
                      WHERE {names} AND {col} OPERATOR(pg_catalog.=) $1
                        AND changed_at OPERATOR(pg_catalog.>) $2
                      ORDER BY changed_at, id LIMIT 1",
                    names = t.log_filter()
                );
                let mut rows = select_kept(c, &q, &[row_id.to_string().into(), at.into()])?;
                if let Some(r) = rows.next() {
                    let when = r.get::<TimestampWithTimeZone>(5)?.unwrap_or(at);
                    let id = r.get::<i64>(6)?.unwrap_or(0);
                    let ch = Change {
                        op: r.get::<String>(1)?.unwrap_or_default(),
                        old: r.get::<JsonB>(2)?.map(|j| j.0),
                        new: r.get::<JsonB>(3)?.map(|j| j.0),
                        as_old_key: as_old,
                        key_moved_in: !as_old && r.get::<bool>(4)?.unwrap_or(false),
                        changed_at: when,
                    };
                    if best.as_ref().is_none_or(|(w, i, _)| (when, id) < (*w, *i)) {
                        best = Some((when, id, ch));
                    }
                }
            }
            let trunc = select_kept(
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
            .and_then(|r| r.get::<TimestampWithTimeZone>(1).ok().flatten());
            Ok((best.map(|b| b.2), trunc))
        })
    })
}

fn state_at_impl(
    rel: Option<PgRelation>,
    row_id: Option<String>,
    at: Option<TimestampWithTimeZone>,
) -> Result<Option<Value>> {
    let rel = rel.ok_or(AuditError::NullArgument("tbl"))?;
    let row_id = row_id.ok_or(AuditError::NullArgument("row_id"))?;
    let at = at.ok_or(AuditError::NullArgument("at"))?;
    let t = Table::load(&rel)?;
    t.need_key()?;
    t.check_at(at)?;
    let (change, truncated) = first_change_after(&t, &row_id, at)?;
    match (change, truncated) {
        (Some(ch), tr) if tr.is_none_or(|tr| ch.changed_at <= tr) => {
            Ok(state_from_first_change(&ch.op, ch.as_old_key, ch.key_moved_in, ch.old, ch.new))
        }
        (_, Some(tr)) => Err(t.truncated(tr)),
        (None, None) => {
            let live =
                t.live_rows(&format!("WHERE {}", t.key_predicate(1)), &[row_id.clone().into()])?;
            Ok(live.into_iter().next().map(|(_, v)| v))
        }
        (Some(_), None) => unreachable!("covered by the first arm"),
    }
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
    row_id: Option<String>,
    at: Option<TimestampWithTimeZone>,
) -> Option<JsonB> {
    let relid = tbl.as_ref().map(|r| r.oid());
    let _q = crate::quiet::Quiet::enter();
    let state = state_at_impl(tbl, row_id, at).or_raise();
    noted(relid, "audit.state_at", state.is_some() as i64);
    state.map(JsonB)
}

fn table_at_impl(rel: Option<PgRelation>, at: Option<TimestampWithTimeZone>) -> Result<Vec<Value>> {
    let rel = rel.ok_or(AuditError::NullArgument("tbl"))?;
    let at = at.ok_or(AuditError::NullArgument("at"))?;
    let t = Table::load(&rel)?;
    t.need_key()?;
    t.check_at(at)?;
    let (_, truncated) = first_change_after(&t, "\u{0}", at)?;
    if let Some(tr) = truncated {
        return Err(t.truncated(tr));
    }
    let q = format!(
        "WITH ch AS (
            SELECT row_id AS k, false AS as_old, old_row_id IS NOT NULL AS moved_in, operation, old_values, new_values, changed_at, id
              FROM audit.log
             WHERE {names} AND changed_at OPERATOR(pg_catalog.>) $1 AND row_id IS NOT NULL
            UNION ALL
            SELECT old_row_id, true, false, operation, old_values, new_values, changed_at, id
              FROM audit.log
             WHERE {names} AND changed_at OPERATOR(pg_catalog.>) $1 AND old_row_id IS NOT NULL
         ), firsts AS (
            SELECT DISTINCT ON (k) * FROM ch ORDER BY k, changed_at, id
         )
         SELECT k, CASE
                  WHEN as_old THEN new_values OPERATOR(pg_catalog.||) old_values
                  WHEN operation OPERATOR(pg_catalog.=) 'INSERT' THEN NULL
                  WHEN operation OPERATOR(pg_catalog.=) 'UPDATE' AND moved_in THEN NULL
                  WHEN operation OPERATOR(pg_catalog.=) 'UPDATE' THEN new_values OPERATOR(pg_catalog.||) old_values
                  WHEN operation OPERATOR(pg_catalog.=) 'SNAPSHOT' THEN new_values
                  ELSE old_values END
           FROM firsts",
        names = t.log_filter()
    );
    // Rows changed after `at` come from the log (as the owner), the rest from the table (as the caller).
    let mut changed = std::collections::HashSet::new();
    let mut out = Vec::new();
    as_extension_owner(|| {
        Spi::connect(|c| -> Result<()> {
            for r in c.select(&q, None, &[at.into()])? {
                changed.insert(r.get::<String>(1)?.unwrap_or_default());
                if let Some(j) = r.get::<JsonB>(2)? {
                    out.push(j.0);
                }
            }
            Ok(())
        })
    })?;
    for (k, v) in t.live_rows("", &[])? {
        if !changed.contains(&k) {
            out.push(v);
        }
    }
    Ok(out)
}

#[pg_extern(stable, parallel_safe)]
fn table_at(
    tbl: Option<PgRelation>,
    at: Option<TimestampWithTimeZone>,
) -> SetOfIterator<'static, JsonB> {
    let relid = tbl.as_ref().map(|r| r.oid());
    let _q = crate::quiet::Quiet::enter();
    let rows = table_at_impl(tbl, at).or_raise();
    noted(relid, "audit.table_at", rows.len() as i64);
    SetOfIterator::new(rows.into_iter().map(JsonB))
}

/// A row's history, each log row made into `T` by `row` (the pg_extern's own
/// column list, so that the columns are written down once).
fn history_impl<T>(
    rel: Option<PgRelation>,
    row_id: Option<String>,
    row: impl Fn(&pgrx::spi::SpiHeapTupleData) -> Result<T>,
) -> Result<Vec<T>> {
    let rel = rel.ok_or(AuditError::NullArgument("tbl"))?;
    let row_id = row_id.ok_or(AuditError::NullArgument("row_id"))?;
    let t = Table::load(&rel)?;
    t.need_key()?;
    as_extension_owner(|| {
        Spi::connect(|c| -> Result<Vec<T>> {
            let rows = c.select(
                &format!(
                    "SELECT id, changed_at, txid, operation, changed_by, changed_fields, old_values, new_values,
                            CASE WHEN operation OPERATOR(pg_catalog.=) 'DELETE' THEN NULL
                                 WHEN row_id OPERATOR(pg_catalog.<>) $1 THEN NULL
                                 ELSE new_values END
                       FROM audit.log
                      WHERE {} AND (row_id OPERATOR(pg_catalog.=) $1 OR old_row_id OPERATOR(pg_catalog.=) $1)
                      ORDER BY changed_at, id",
                    t.log_filter()
                ),
                None,
                &[row_id.clone().into()],
            )?;
            rows.map(|r| row(&r)).collect()
        })
    })
}

#[allow(clippy::type_complexity)] // the result's columns, as pgrx spells them
#[pg_extern(stable, parallel_safe)]
fn history(
    tbl: Option<PgRelation>,
    row_id: Option<String>,
) -> TableIterator<
    'static,
    (
        name!(id, i64),
        name!(changed_at, TimestampWithTimeZone),
        name!(txid, i64),
        name!(operation, String),
        name!(changed_by, String),
        name!(changed_fields, Option<Vec<String>>),
        name!(old_values, Option<JsonB>),
        name!(new_values, Option<JsonB>),
        name!(state, Option<JsonB>),
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
            r.get(9)?,
        ))
    });
    let rows = rows.or_raise();
    noted(relid, "audit.history", rows.len() as i64);
    TableIterator::new(rows)
}
