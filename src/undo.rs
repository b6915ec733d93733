//! audit.undo: reverses one transaction's changes from the log, newest first.
//! A SNAPSHOT (audit.baseline) records a row, it does not change one: it is
//! never undone, and it is no "later change" that would block an undo.
//! It validates everything (each table still exists and has a key, no later
//! change by another transaction, no TRUNCATE, no value the log lacks) before it
//! changes anything, so a refused undo changes nothing. Reads of the log run as
//! the extension owner; the writes run as the caller, so table privileges apply.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use pgrx::prelude::*;
use pgrx::PgRelation;

use crate::db_text::{ident_text, DbJson, DbText};
use serde_json::Value;

use crate::errors::{AuditError, OrRaise, Result};
use crate::privilege::as_extension_owner;
use crate::quote::ident as quote_ident;
use crate::time_travel::Table;

/// One audit row of the transaction.
struct Step {
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
    let steps = load_steps(txid)?;
    if steps.is_empty() {
        return Err(if took_baseline(txid)? {
            AuditError::UndoRefused(format!(
                "transaction {txid} only took a baseline (SNAPSHOT rows), which changed no table: a baseline is never undone"
            ))
        } else {
            AuditError::UndoNothing(txid)
        });
    }
    let targets = validate(txid, force, &steps)?;
    apply(txid, force, &steps, &targets)
}

/// The transaction's audit rows (DDL aside), newest first.
fn load_steps(txid: i64) -> Result<Vec<Step>> {
    as_extension_owner(|| {
        Spi::connect(|c| -> Result<Vec<Step>> {
            let rows = c.select(
                "SELECT id, schema_name, table_name, operation, row_id, old_values FROM audit.log
                  WHERE txid OPERATOR(pg_catalog.=) $1
                    AND operation OPERATOR(pg_catalog.<>) ALL (ARRAY['DDL', 'SNAPSHOT'])
                  ORDER BY id DESC",
                None,
                &[txid.into()],
            )?;
            let mut v = Vec::new();
            for r in rows {
                v.push(Step {
                    id: r.get::<i64>(1)?.unwrap_or_default(),
                    // Names that go into the SQL that undoes the change.
                    schema: ident_text(&r.get::<DbText>(2)?.unwrap_or_default())?,
                    table: ident_text(&r.get::<DbText>(3)?.unwrap_or_default())?,
                    op: r.get::<DbText>(4)?.unwrap_or_default().0,
                    // The key and the image come back as the bytes the log holds (crate::db_text).
                    row_id: r.get::<DbText>(5)?.map(|t| t.0),
                    old: r.get::<DbJson>(6)?.map(|j| j.0),
                });
            }
            Ok(v)
        })
    })
}

/// Whether the transaction wrote SNAPSHOT rows (audit.baseline), which undo skips.
fn took_baseline(txid: i64) -> Result<bool> {
    as_extension_owner(|| {
        Ok(Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM audit.log WHERE txid OPERATOR(pg_catalog.=) $1
                             AND operation OPERATOR(pg_catalog.=) 'SNAPSHOT')",
            &[txid.into()],
        )?
        .unwrap_or(false))
    })
}

/// Each table the transaction changed, by the (schema, table) its rows carry.
type Targets = HashMap<(String, String), (Table, Vec<ColInfo>)>;

/// Checks every step before anything is changed: a refused undo changes nothing.
/// Locks the rows it will restore, so later changes cannot slip in between.
fn validate(txid: i64, force: bool, steps: &[Step]) -> Result<Targets> {
    let mut tables = Targets::default();
    for s in steps {
        let q = format!("{}.{}", quote_ident(&s.schema), quote_ident(&s.table));
        if s.op == "TRUNCATE" {
            return Err(AuditError::UndoRefused(format!(
                "transaction {txid} truncated {q}; TRUNCATE does not log the rows it removed, so it cannot be undone"
            )));
        }
        let (t, cols) = match tables.entry((s.schema.clone(), s.table.clone())) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(open_target(s, &q)?),
        };
        let (t, cols) = (&*t, &*cols);
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
                &[DbText(rid.clone()).into()],
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
                            AND operation OPERATOR(pg_catalog.<>) 'SNAPSHOT'
                          ORDER BY id LIMIT 1)",
                        t.log_filter()
                    ),
                    &[DbText(rid.clone()).into(), s.id.into(), txid.into()],
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
    Ok(tables)
}

/// Opens the table a step's row belongs to: the one that had the row's name
/// when it was logged (it may have been renamed since), else whatever has the
/// name now. It must still have a row key.
fn open_target(s: &Step, q: &str) -> Result<(Table, Vec<ColInfo>)> {
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
            &[q.into()],
        )?,
    }
    .ok_or_else(|| AuditError::UndoRefused(format!("table {q} no longer exists")))?;
    // SAFETY: the oid was just resolved from a name; with_lock opens and locks it.
    let rel = unsafe { PgRelation::with_lock(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
    let t = Table::load(&rel)?;
    t.need_key()?;
    let cols = columns(oid)?;
    Ok((t, cols))
}

/// Restores each step's row, newest first; returns how many rows were restored.
fn apply(txid: i64, force: bool, steps: &[Step], tables: &Targets) -> Result<i64> {
    let mut restored = 0i64;
    for s in steps {
        let (t, cols) = &tables[&(s.schema.clone(), s.table.clone())];
        let rid = s.row_id.clone().unwrap_or_default();
        let old = s.old.clone().unwrap_or(Value::Null);
        match s.op.as_str() {
            "INSERT" => {
                Spi::run_with_args(
                    &format!("DELETE FROM {} t WHERE {}", t.qname, t.key_predicate(1)),
                    &[DbText(rid).into()],
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
                    &[DbText(rid).into(), DbJson(old).into()],
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
                        &[DbJson(old).into()],
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
                name: ident_text(&r.get::<DbText>(1)?.unwrap_or_default())?,
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
    let _q = crate::quiet::Quiet::enter();
    undo_impl(txid, force).or_raise()
}
