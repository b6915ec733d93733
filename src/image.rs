//! What one audit row says about its row's image, and how states are rebuilt
//! from rows of both capture modes (`audit.track(…, capture => …)`).
//!
//! A row is *complete* when it says the whole row on its own: INSERT (new),
//! DELETE (old), SNAPSHOT (new), and an UPDATE whose new_values is the whole new
//! row (every `full`-mode UPDATE, and some `changes`-mode ones, below). It is
//! *partial* when it is an UPDATE whose new_values holds only changed columns:
//! its keys are all in changed_fields. (A `full`-mode UPDATE that changed every
//! column is read as partial too; it then says the same, the fold just walks on.)
//!
//! State at a moment = the state before the first change after it (the one-probe
//! rule of crate::time_travel). Before a complete change it is that change's own
//! before-image; before a partial one it is the state after it with its
//! old_values put back, so the walk goes forward, change by change, until a
//! complete change or the live row (the state after the last change). To keep
//! that walk short, a `changes`-mode UPDATE writes the whole new row with
//! probability 1 / `audit.image_every` (default [`DEFAULT_IMAGE_EVERY`]; a
//! backend-local draw: no counter per row is kept or read), and always when its
//! key moves. The expected walk is image_every changes, and the chance of a walk
//! longer than k·image_every is about e^-k, whatever the row's number of changes.
//! Answers never depend on the draw, only the walk's length does.
//!
//! Values are merged as parsed jsonb (serde_json with arbitrary_precision: a
//! numeric's digits and scale, and every string, stay exactly as stored).

use std::cell::Cell;

use serde_json::{Map, Value};

use crate::db_text::{DbJson, DbText};

/// A `changes`-mode UPDATE writes the whole new row about once in this many
/// (`audit.image_every`).
pub const DEFAULT_IMAGE_EVERY: i32 = 16;

thread_local! {
    static DRAW: Cell<u64> = const { Cell::new(0) };
}

/// Whether this `changes`-mode UPDATE writes the whole new row: true about once
/// in `audit.image_every` calls (xorshift64*, seeded per backend). Not secret: a
/// writer who could steer it only makes time travel walk further.
pub fn draw_full_image() -> bool {
    let every = crate::settings::IMAGE_EVERY.get();
    if every <= 1 {
        return every == 1;
    }
    DRAW.with(|d| {
        let mut x = d.get();
        if x == 0 {
            // SAFETY: plain reads of this backend's pid and start time.
            let (pid, start) = unsafe { (pgrx::pg_sys::MyProcPid, pgrx::pg_sys::MyStartTimestamp) };
            x = ((pid as u64) << 32 ^ start as u64) | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        d.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % every as u64 == 0
    })
}

/// SQL predicate, on audit.log's columns, of a partial row: the same rule as
/// [`Change::partial`] (a pg_test holds them equal). `moved` is an SQL boolean
/// saying the row moves its key in or out of the key being looked at.
pub fn partial_sql(moved: &str) -> String {
    format!(
        "(operation OPERATOR(pg_catalog.=) 'UPDATE' AND NOT ({moved}) AND changed_fields IS NOT NULL \
          AND (new_values OPERATOR(pg_catalog.-) changed_fields) OPERATOR(pg_catalog.=) '{{}}'::pg_catalog.jsonb)"
    )
}

/// One audit row of a key, as the readers need it.
#[derive(Debug, Clone)]
pub struct Change {
    pub op: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
    pub fields: Option<Vec<String>>,
    /// The row left this key (its old_row_id is the key).
    pub as_old_key: bool,
    /// The row came to this key from another one (row_id is the key, old_row_id set).
    pub key_moved_in: bool,
}

/// The state before a run of changes, when the run did not end in a complete one.
#[derive(Debug, PartialEq)]
pub enum Before {
    Known(Option<Value>),
    /// Every change was partial: these values (the earliest old value of each
    /// column) go over the state after the last change (the live row).
    Overlay(Map<String, Value>),
}

/// `base` with `top`'s keys put over it.
fn over(base: Option<Value>, top: Map<String, Value>) -> Option<Value> {
    match base {
        Some(Value::Object(mut m)) => {
            m.extend(top);
            Some(Value::Object(m))
        }
        other => other,
    }
}

impl Change {
    /// A log row's change, from columns `first..first+4` of `r`: operation,
    /// old_values, new_values, changed_fields, old_row_id IS NOT NULL.
    pub fn from_row(
        r: &pgrx::spi::SpiHeapTupleData,
        first: usize,
        as_old_key: bool,
    ) -> crate::errors::Result<Change> {
        Ok(Change::of(
            r.get::<DbText>(first)?.map(|t| t.0),
            r.get::<DbJson>(first + 1)?,
            r.get::<DbJson>(first + 2)?,
            crate::db_text::strings(r.get::<Vec<DbText>>(first + 3)?),
            r.get::<bool>(first + 4)?,
            as_old_key,
        ))
    }

    /// As [`Change::from_row`], from the values and nulls of a row that
    /// `live_rows::Cursor::push` hands over (a cursor on the active snapshot).
    ///
    /// # Safety
    /// `v` and `n` must hold at least 5 columns, valid for the call: text,
    /// jsonb, jsonb, text[] and bool.
    pub unsafe fn from_values(v: &[pgrx::pg_sys::Datum], n: &[bool], as_old_key: bool) -> Change {
        use pgrx::FromDatum;
        // SAFETY: the caller's contract gives each column's type; the values are
        // converted (copied) before the row goes.
        unsafe {
            Change::of(
                DbText::from_datum(v[0], n[0]).map(|t| t.0),
                DbJson::from_datum(v[1], n[1]),
                DbJson::from_datum(v[2], n[2]),
                crate::db_text::strings(Vec::<DbText>::from_datum(v[3], n[3])),
                bool::from_datum(v[4], n[4]),
                as_old_key,
            )
        }
    }

    fn of(
        op: Option<String>,
        old: Option<DbJson>,
        new: Option<DbJson>,
        fields: Option<Vec<String>>,
        moved: Option<bool>,
        as_old_key: bool,
    ) -> Change {
        Change {
            op: op.unwrap_or_default(),
            old: old.map(|j| j.0),
            new: new.map(|j| j.0),
            fields,
            as_old_key,
            key_moved_in: !as_old_key && moved.unwrap_or(false),
        }
    }

    /// An UPDATE whose new_values holds only changed columns (see the module docs).
    pub fn partial(&self) -> bool {
        self.op == "UPDATE"
            && !self.as_old_key
            && !self.key_moved_in
            && match (&self.new, &self.fields) {
                (Some(Value::Object(m)), Some(f)) => m.keys().all(|k| f.iter().any(|c| c == k)),
                _ => false,
            }
    }

    /// The state just before a complete change.
    fn before(self) -> Option<Value> {
        let merged = |new: Option<Value>, old: Option<Value>| {
            let mut base = match new {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            };
            if let Some(Value::Object(o)) = old {
                base.extend(o);
            }
            Some(Value::Object(base))
        };
        if self.as_old_key {
            return merged(self.new, self.old); // the row left this key: before that change it had it
        }
        match self.op.as_str() {
            "INSERT" => None,
            "UPDATE" if self.key_moved_in => None, // the key arrived with this change
            "UPDATE" => merged(self.new, self.old),
            "DELETE" => self.old,
            // audit.baseline's record of the row as it was then (and since tracking began).
            "SNAPSHOT" => self.new,
            _ => None,
        }
    }

    /// The state just after a complete change, under this key.
    fn after(self) -> Option<Value> {
        if self.as_old_key {
            return None;
        }
        match self.op.as_str() {
            "INSERT" | "UPDATE" | "SNAPSHOT" => self.new,
            _ => None,
        }
    }
}

/// The state before the first of `changes` (one key's, in order).
pub fn before_first(changes: impl IntoIterator<Item = Change>) -> Before {
    let mut overlay = Map::new();
    for ch in changes {
        if !ch.partial() {
            return Before::Known(over(ch.before(), overlay));
        }
        if let Some(Value::Object(old)) = ch.old {
            for (k, v) in old {
                overlay.entry(k).or_insert(v);
            }
        }
    }
    Before::Overlay(overlay)
}

/// The state after the last of `changes` (one key's, newest first). `None` when
/// no complete change was found: then the newest values of each column are all
/// that is known. SNAPSHOTs give way to real changes whatever their ids
/// (crate::baseline says why): one is the base only when no real change is.
pub fn after_last(changes: impl IntoIterator<Item = Change>) -> Option<Option<Value>> {
    let mut overlay = Map::new();
    let mut snapshot = None;
    for ch in changes {
        if ch.op == "SNAPSHOT" {
            snapshot.get_or_insert(ch);
            continue;
        }
        if !ch.partial() {
            return Some(over(ch.after(), overlay));
        }
        if let Some(Value::Object(new)) = ch.new {
            for (k, v) in new {
                overlay.entry(k).or_insert(v);
            }
        }
    }
    snapshot.map(|s| over(s.after(), overlay))
}

/// The state after `ch`, from the state before it (None: unknown), going forward.
pub fn step(before: Option<Option<Value>>, ch: &Change) -> Option<Option<Value>> {
    if !ch.partial() {
        return Some(ch.clone().after());
    }
    let new = match &ch.new {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    before.map(|b| over(b, new))
}

/// Applies a forward fold's overlay to the state after the last change.
pub fn resolve(before: Before, live: impl FnOnce() -> Option<Value>) -> Option<Value> {
    match before {
        Before::Known(v) => v,
        Before::Overlay(o) => over(live(), o),
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;
    use serde_json::json;

    fn upd(old: Value, new: Value, fields: &[&str]) -> Change {
        Change {
            op: "UPDATE".into(),
            old: Some(old),
            new: Some(new),
            fields: Some(fields.iter().map(|s| s.to_string()).collect()),
            as_old_key: false,
            key_moved_in: false,
        }
    }

    #[pg_test]
    fn forward_and_backward_folds_agree_with_full_images() {
        // id 1: a=1 b=1 -> a=2 -> b=3 -> (whole) a=4
        let p1 = upd(json!({"a": 1}), json!({"a": 2}), &["a"]);
        let p2 = upd(json!({"b": 1}), json!({"b": 3}), &["b"]);
        let f3 = upd(json!({"a": 2}), json!({"id": 1, "a": 4, "b": 3}), &["a"]);
        assert!(p1.partial() && p2.partial() && !f3.partial());
        let before = before_first([p1.clone(), p2.clone(), f3.clone()]);
        assert_eq!(before, Before::Known(Some(json!({"id": 1, "a": 1, "b": 1}))));
        // Partial to the end: the live row completes it.
        let live = || Some(json!({"id": 1, "a": 2, "b": 3}));
        assert_eq!(
            resolve(before_first([p1.clone(), p2.clone()]), live),
            Some(json!({"id": 1, "a": 1, "b": 1}))
        );
        let ins = Change {
            op: "INSERT".into(),
            old: None,
            new: Some(json!({"id": 1, "a": 1, "b": 1})),
            fields: None,
            as_old_key: false,
            key_moved_in: false,
        };
        assert_eq!(
            after_last([p2.clone(), p1.clone(), ins.clone()]),
            Some(Some(json!({"id": 1, "a": 2, "b": 3})))
        );
        assert_eq!(after_last([p2, p1]), None);
        // Numbers keep their digits and scale through a fold.
        let n = upd(
            json!({"a": 1}),
            serde_json::from_str(r#"{"a": 0.10000000000000000001}"#).unwrap(),
            &["a"],
        );
        let v = after_last([n, ins]).unwrap().unwrap();
        assert_eq!(v["a"].to_string(), "0.10000000000000000001");
    }

    #[pg_test]
    fn the_sql_partial_rule_is_the_rust_one() {
        Spi::run(
            "CREATE TABLE pr (operation text, new_values jsonb, changed_fields text[], moved bool);
             INSERT INTO pr VALUES
               ('UPDATE', '{\"a\": 1}', '{a}', false),
               ('UPDATE', '{\"a\": 1, \"b\": 2}', '{a}', false),
               ('UPDATE', '{\"a\": 1}', '{a}', true),
               ('UPDATE', '{}', '{a}', false),
               ('INSERT', '{\"a\": 1}', NULL, false),
               ('DELETE', NULL, NULL, false),
               ('SNAPSHOT', '{\"a\": 1}', NULL, false)",
        )
        .unwrap();
        let q = format!(
            "SELECT operation, new_values, changed_fields, moved, COALESCE({}, false) FROM pr",
            partial_sql("moved")
        );
        Spi::connect(|c| {
            for r in c.select(&q, None, &[]).unwrap() {
                let ch = Change {
                    op: r.get::<String>(1).unwrap().unwrap(),
                    old: None,
                    new: r.get::<pgrx::JsonB>(2).unwrap().map(|j| j.0),
                    fields: r.get::<Vec<String>>(3).unwrap(),
                    as_old_key: false,
                    key_moved_in: r.get::<bool>(4).unwrap().unwrap(),
                };
                assert_eq!(ch.partial(), r.get::<bool>(5).unwrap().unwrap(), "{ch:?}");
            }
        });
    }
}
