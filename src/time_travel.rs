//! Time travel: audit.state_at, audit.table_at, audit.history and audit.undo.
//!
//! The state of a row at time `at` is read from the first change after `at`
//! (one index probe): INSERT means it did not exist, UPDATE means
//! `new_values || old_values`, DELETE means `old_values`; with no later change
//! it is the live row. Reads of the log run as the extension owner; reads of
//! live rows and undo's writes run as the caller, so table privileges apply and
//! no user code (casts, output functions) runs with the owner's rights.

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
struct Table {
    qname: String,
    /// (column, SQL type) of the row key, in key order.
    key: Vec<(String, String)>,
    /// (schema, table, since) of every name it has had, oldest first; `since` is an
    /// ISO 8601 UTC timestamp, or None for "as far back as the log goes".
    names: Vec<(String, String, Option<String>)>,
    exclude: Vec<String>,
    redact: Vec<String>,
    earliest: TimestampWithTimeZone,
}

impl Table {
    fn load(rel: &PgRelation) -> Result<Table> {
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
        let key = Spi::connect(|c| -> Result<Vec<(String, String)>> {
            // The primary key, else the replica identity index: the same key the trigger uses.
            let rows = select_kept(
                c,
                "WITH idx AS (
                    SELECT i.indkey, i.indnkeyatts FROM pg_catalog.pg_index i
                     WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND (i.indisprimary OR i.indisreplident)
                     ORDER BY i.indisprimary DESC LIMIT 1)
                 SELECT a.attname::pg_catalog.text, pg_catalog.format_type(a.atttypid, a.atttypmod)
                   FROM idx, pg_catalog.generate_subscripts(idx.indkey, 1) AS s(n)
                   JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) $1
                  WHERE a.attnum OPERATOR(pg_catalog.=) idx.indkey[s.n] AND s.n OPERATOR(pg_catalog.<) idx.indnkeyatts
                  ORDER BY s.n",
                &[relid.into()],
            )?;
            let mut v = Vec::new();
            for r in rows {
                v.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                ));
            }
            Ok(v)
        })?;
        Ok(Table { qname, key, names, exclude, redact, earliest })
    }

    /// SQL predicate on audit.log selecting this table's rows: under each name it
    /// had, for the time it had it (bounds inclusive: a row has one name, and a
    /// rename's own transaction has one timestamp).
    fn log_filter(&self) -> String {
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

    fn need_key(&self) -> Result<()> {
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
    fn key_predicate(&self, n: usize) -> String {
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
        if self.key.len() == 1 {
            // The type's output function, as the trigger uses (bool::text would say 'true').
            return format!("pg_catalog.format('%s', t.{})", quote_ident(&self.key[0].0));
        }
        let cols: Vec<String> =
            self.key.iter().map(|(c, _)| format!("t.{}", quote_ident(c))).collect();
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
            Some(crate::capture::secret(crate::capture::cache::ext_state()?.owner)?)
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

#[pg_extern(stable, parallel_safe)]
fn state_at(
    tbl: Option<PgRelation>,
    row_id: Option<String>,
    at: Option<TimestampWithTimeZone>,
) -> Option<JsonB> {
    state_at_impl(tbl, row_id, at).or_raise().map(JsonB)
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
    SetOfIterator::new(table_at_impl(tbl, at).or_raise().into_iter().map(JsonB))
}

type HistoryRow = (
    name!(id, i64),
    name!(changed_at, TimestampWithTimeZone),
    name!(txid, i64),
    name!(operation, String),
    name!(changed_by, String),
    name!(changed_fields, Option<Vec<String>>),
    name!(old_values, Option<JsonB>),
    name!(new_values, Option<JsonB>),
    name!(state, Option<JsonB>),
);

fn history_impl(rel: Option<PgRelation>, row_id: Option<String>) -> Result<Vec<HistoryRow>> {
    let rel = rel.ok_or(AuditError::NullArgument("tbl"))?;
    let row_id = row_id.ok_or(AuditError::NullArgument("row_id"))?;
    let t = Table::load(&rel)?;
    t.need_key()?;
    as_extension_owner(|| {
        Spi::connect(|c| -> Result<Vec<HistoryRow>> {
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
            let mut out = Vec::new();
            for r in rows {
                out.push((
                    r.get::<i64>(1)?.unwrap_or_default(),
                    r.get::<TimestampWithTimeZone>(2)?
                        .ok_or(AuditError::Internal("null changed_at".into()))?,
                    r.get::<i64>(3)?.unwrap_or_default(),
                    r.get::<String>(4)?.unwrap_or_default(),
                    r.get::<String>(5)?.unwrap_or_default(),
                    r.get::<Vec<String>>(6)?,
                    r.get::<JsonB>(7)?,
                    r.get::<JsonB>(8)?,
                    r.get::<JsonB>(9)?,
                ));
            }
            Ok(out)
        })
    })
}

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
    TableIterator::new(history_impl(tbl, row_id).or_raise())
}

struct UndoStep {
    id: i64,
    schema: String,
    table: String,
    op: String,
    row_id: Option<String>,
    old: Option<Value>,
}

fn undo_impl(txid: Option<i64>, force: Option<bool>) -> Result<i64> {
    crate::query::refuse_during_recovery(c"audit.undo()");
    let txid = txid.ok_or(AuditError::NullArgument("txid"))?;
    let force = force.unwrap_or(false);
    let steps: Vec<UndoStep> = as_extension_owner(|| {
        Spi::connect(|c| -> Result<Vec<UndoStep>> {
            let rows = c.select(
                "SELECT id, schema_name, table_name, operation, row_id, old_values FROM audit.log
                  WHERE txid OPERATOR(pg_catalog.=) $1 AND operation OPERATOR(pg_catalog.<>) 'DDL'
                  ORDER BY id DESC",
                None,
                &[txid.into()],
            )?;
            let mut v = Vec::new();
            for r in rows {
                v.push(UndoStep {
                    id: r.get::<i64>(1)?.unwrap_or_default(),
                    schema: r.get::<String>(2)?.unwrap_or_default(),
                    table: r.get::<String>(3)?.unwrap_or_default(),
                    op: r.get::<String>(4)?.unwrap_or_default(),
                    row_id: r.get::<String>(5)?,
                    old: r.get::<JsonB>(6)?.map(|j| j.0),
                });
            }
            Ok(v)
        })
    })?;
    if steps.is_empty() {
        return Err(AuditError::UndoNothing(txid));
    }

    // Validate everything before changing anything: a refused undo changes nothing.
    let mut tables: std::collections::HashMap<(String, String), (Table, Vec<ColInfo>)> =
        Default::default();
    for s in &steps {
        let q = format!("{}.{}", quote_ident(&s.schema), quote_ident(&s.table));
        if s.op == "TRUNCATE" {
            return Err(AuditError::UndoRefused(format!(
                "transaction {txid} truncated {q}; TRUNCATE does not log the rows it removed, so it cannot be undone"
            )));
        }
        if !tables.contains_key(&(s.schema.clone(), s.table.clone())) {
            // The table that had this name when the row was logged (it may have been
            // renamed since), else whatever has the name now.
            let known = as_extension_owner(|| {
                Ok(Spi::get_one_with_args::<pg_sys::Oid>(
                    "SELECT (SELECT relid::pg_catalog.oid FROM audit.table_names
                              WHERE schema_name OPERATOR(pg_catalog.=) $1 AND table_name OPERATOR(pg_catalog.=) $2
                              ORDER BY valid_from DESC LIMIT 1)",
                    &[s.schema.clone().into(), s.table.clone().into()],
                )?)
            })?;
            let oid = match known {
                Some(o) => Some(o),
                None => Spi::get_one_with_args::<pg_sys::Oid>(
                    "SELECT pg_catalog.to_regclass($1)::pg_catalog.oid",
                    &[q.clone().into()],
                )?,
            }
            .ok_or_else(|| AuditError::UndoRefused(format!("table {q} no longer exists")))?;
            // SAFETY: the oid was just resolved from a name; with_lock opens and locks it.
            let rel =
                unsafe { PgRelation::with_lock(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
            let t = Table::load(&rel)?;
            t.need_key()?;
            let cols = columns(oid)?;
            tables.insert((s.schema.clone(), s.table.clone()), (t, cols));
        }
        let (t, cols) = &tables[&(s.schema.clone(), s.table.clone())];
        let rid = s
            .row_id
            .clone()
            .ok_or_else(|| AuditError::UndoRefused(format!("audit row {} has no row_id", s.id)))?;
        // Lock the row first, then look for a later change: a transaction that changed
        // it after the one undone, and has not committed yet, is waited for here, so
        // its change is in the log when we look (a lost update otherwise).
        if !force && matches!(s.op.as_str(), "UPDATE" | "INSERT") {
            Spi::run_with_args(
                &format!("SELECT FROM {} t WHERE {} FOR UPDATE", t.qname, t.key_predicate(1)),
                &[rid.clone().into()],
            )?;
        }
        // A later change by another transaction to the same row?
        if !force {
            let later = as_extension_owner(|| {
                Ok(Spi::get_one_with_args::<i64>(
                    &format!(
                        "SELECT (SELECT id FROM audit.log
                          WHERE {} AND (row_id OPERATOR(pg_catalog.=) $1 OR old_row_id OPERATOR(pg_catalog.=) $1)
                            AND id OPERATOR(pg_catalog.>) $2 AND txid OPERATOR(pg_catalog.<>) $3
                          ORDER BY id LIMIT 1)",
                        t.log_filter()
                    ),
                    &[rid.clone().into(), s.id.into(), txid.into()],
                )?)
            })?;
            if let Some(later) = later {
                return Err(AuditError::UndoConflict(format!(
                    "row {rid} of {} was changed again after transaction {txid} (audit row {later}); undo refused",
                    t.qname
                )));
            }
        }
        let old_keys: Vec<String> = match &s.old {
            Some(Value::Object(m)) => m.keys().cloned().collect(),
            _ => vec![],
        };
        match s.op.as_str() {
            "UPDATE" => {
                if let Some(c) = old_keys.iter().find(|k| t.redact.contains(k)) {
                    return Err(AuditError::UndoRefused(format!(
                        "column {c} of {} is redacted: the log does not hold its previous value (audit row {})",
                        t.qname, s.id
                    )));
                }
            }
            "DELETE" => {
                for col in cols {
                    let missing = t.exclude.contains(&col.name) || t.redact.contains(&col.name);
                    if missing && col.not_null && !col.has_default {
                        return Err(AuditError::UndoRefused(format!(
                            "column {} of {} is {} and NOT NULL without a default: the log does not hold its value (audit row {})",
                            col.name,
                            t.qname,
                            if t.exclude.contains(&col.name) { "excluded" } else { "redacted" },
                            s.id
                        )));
                    }
                }
            }
            _ => {}
        }
    }

    let mut restored = 0i64;
    for s in &steps {
        let (t, cols) = &tables[&(s.schema.clone(), s.table.clone())];
        let rid = s.row_id.clone().unwrap_or_default();
        let old = s.old.clone().unwrap_or(Value::Null);
        match s.op.as_str() {
            "INSERT" => {
                Spi::run_with_args(
                    &format!("DELETE FROM {} t WHERE {}", t.qname, t.key_predicate(1)),
                    &[rid.into()],
                )?;
            }
            "UPDATE" => {
                let names: Vec<&String> = match &old {
                    Value::Object(m) => m.keys().collect(),
                    _ => vec![],
                };
                let writable: Vec<&&String> = names
                    .iter()
                    .filter(|n| cols.iter().any(|c| &c.name == **n && !c.generated))
                    .collect();
                if writable.is_empty() {
                    continue;
                }
                let list = writable.iter().map(|n| quote_ident(n)).collect::<Vec<_>>().join(", ");
                let src = writable
                    .iter()
                    .map(|n| format!("r.{}", quote_ident(n)))
                    .collect::<Vec<_>>()
                    .join(", ");
                Spi::run_with_args(
                    &format!(
                        "UPDATE {tbl} t SET ({list}) = (SELECT {src} FROM pg_catalog.jsonb_populate_record(NULL::{tbl}, $2) r)
                          WHERE {pred}",
                        tbl = t.qname,
                        pred = t.key_predicate(1)
                    ),
                    &[rid.into(), JsonB(old).into()],
                )?;
            }
            "DELETE" => {
                let present: Vec<&ColInfo> = cols
                    .iter()
                    .filter(|c| {
                        !c.generated && !t.exclude.contains(&c.name) && !t.redact.contains(&c.name)
                    })
                    .collect();
                let list =
                    present.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
                let src = present
                    .iter()
                    .map(|c| format!("r.{}", quote_ident(&c.name)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let overriding = if cols.iter().any(|c| c.identity_always) {
                    "OVERRIDING SYSTEM VALUE"
                } else {
                    ""
                };
                // A row with the key, inserted since (perhaps not yet committed when we
                // checked): ON CONFLICT waits for it, and finding it means a later change.
                let on_conflict = if force { "" } else { "ON CONFLICT DO NOTHING" };
                let inserted = Spi::connect_mut(|c| -> Result<u64> {
                    Ok(c.update(
                        &format!(
                            "INSERT INTO {tbl} ({list}) {overriding}
                             SELECT {src} FROM pg_catalog.jsonb_populate_record(NULL::{tbl}, $1) r {on_conflict} RETURNING 1",
                            tbl = t.qname
                        ),
                        None,
                        &[JsonB(old).into()],
                    )?
                    .len() as u64)
                })?;
                if inserted == 0 {
                    return Err(AuditError::UndoConflict(format!(
                        "row {rid} of {} was created again after transaction {txid}; undo refused",
                        t.qname
                    )));
                }
            }
            _ => continue,
        }
        restored += 1;
    }
    Ok(restored)
}

struct ColInfo {
    name: String,
    not_null: bool,
    has_default: bool,
    generated: bool,
    identity_always: bool,
}

fn columns(relid: pg_sys::Oid) -> Result<Vec<ColInfo>> {
    Spi::connect(|c| -> Result<Vec<ColInfo>> {
        let rows = c.select(
            "SELECT attname::pg_catalog.text, attnotnull, atthasdef OR attidentity OPERATOR(pg_catalog.<>) '',
                    attgenerated OPERATOR(pg_catalog.<>) '', attidentity OPERATOR(pg_catalog.=) 'a'
               FROM pg_catalog.pg_attribute
              WHERE attrelid OPERATOR(pg_catalog.=) $1 AND attnum OPERATOR(pg_catalog.>) 0 AND NOT attisdropped
              ORDER BY attnum",
            None,
            &[relid.into()],
        )?;
        let mut v = Vec::new();
        for r in rows {
            v.push(ColInfo {
                name: r.get::<String>(1)?.unwrap_or_default(),
                not_null: r.get::<bool>(2)?.unwrap_or(false),
                has_default: r.get::<bool>(3)?.unwrap_or(false),
                generated: r.get::<bool>(4)?.unwrap_or(false),
                identity_always: r.get::<bool>(5)?.unwrap_or(false),
            });
        }
        Ok(v)
    })
}

#[pg_extern(volatile, parallel_unsafe)]
fn undo(txid: Option<i64>, force: default!(Option<bool>, false)) -> i64 {
    undo_impl(txid, force).or_raise()
}
