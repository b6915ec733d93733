//! Capture: the native row and TRUNCATE trigger that writes `audit.log`.

pub mod actor;
pub mod cache;
pub mod encode;

use std::ffi::CStr;
use std::rc::Rc;

use pgrx::pg_sys::{self, Datum};
use pgrx::prelude::*;

use crate::chain::append::{append_captured_row, jsonb_text};
use crate::chain::hash;
use crate::datum::{output_bytes, text_datum};
// Not `Result`: #[pg_trigger] expands to code that names std's Result unqualified.
use crate::errors::{self, AuditError, OrRaise};
use crate::log::Row;
use cache::{Column, RelConfig};

#[pg_trigger]
fn capture<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> core::result::Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, AuditError> {
    // SAFETY: PostgreSQL hands us a valid TriggerData for the duration of the call.
    unsafe { capture_event(trigger.trigger_data()) }.or_raise();
    Ok(None)
}

/// A tuple's columns, deformed once: reading 15 columns one by one with
/// heap_getattr walks the tuple again for each column after the first varlena.
pub(crate) struct Deformed {
    values: Vec<Datum>,
    nulls: Vec<bool>,
}

impl Deformed {
    /// # Safety
    /// `tuple` must match `tupdesc`; the datums point into it and live as long as it does.
    pub(crate) unsafe fn new(tuple: pg_sys::HeapTuple, tupdesc: pg_sys::TupleDesc) -> Deformed {
        // SAFETY: tupdesc is the relation's; the arrays hold natts entries.
        unsafe {
            let natts = (*tupdesc).natts as usize;
            let mut d = Deformed { values: vec![Datum::from(0); natts], nulls: vec![false; natts] };
            pg_sys::heap_deform_tuple(tuple, tupdesc, d.values.as_mut_ptr(), d.nulls.as_mut_ptr());
            d
        }
    }

    /// A row read as its columns (`r.*`: the relation's attributes that are not
    /// dropped, in order, as `attnums` lists them), laid out as [`Deformed::new`]
    /// lays out a tuple; a dropped attribute is NULL, as in a tuple. The datums
    /// are borrowed, valid as long as `values`' are.
    pub(crate) fn from_columns(
        natts: usize,
        attnums: &[i32],
        values: &[Datum],
        nulls: &[bool],
    ) -> Deformed {
        let mut d = Deformed { values: vec![Datum::from(0); natts], nulls: vec![true; natts] };
        for ((&a, &v), &n) in attnums.iter().zip(values).zip(nulls) {
            let i = a as usize - 1;
            d.values[i] = v;
            d.nulls[i] = n;
        }
        d
    }

    fn get(&self, attnum: i32) -> (Datum, bool) {
        let i = attnum as usize - 1;
        (self.values[i], self.nulls[i])
    }
}

/// The value stored for one column: redacted columns become their HMAC marker.
/// Runs as the caller: output functions are user code.
///
/// # Safety
/// `row` must be deformed from a tuple of the relation `col` describes, still alive.
unsafe fn column_value(
    col: &Column,
    row: &Deformed,
    key: Option<&[u8]>,
) -> errors::Result<(Datum, bool)> {
    let (d, isnull) = row.get(col.attnum);
    if col.redacted && !isnull {
        let key =
            key.ok_or_else(|| AuditError::Internal("redacted column without a key".into()))?;
        // SAFETY: non-null datum of the column's type.
        let text = unsafe { output_bytes(d, col.typid) };
        let marker = hash::redaction_marker(key, &text);
        // SAFETY: a fresh text datum in the current memory context.
        return Ok((unsafe { text_datum(marker.as_bytes()) }, false));
    }
    Ok((d, isnull))
}

/// The whole tracked row as jsonb, through the relation's prepared builder.
/// Also how audit.baseline and audit.verify_table see a live row, so that all
/// three write and compare exactly the same image.
///
/// # Safety
/// `row` must be deformed from a tuple of the relation `cfg` describes, still alive.
pub(crate) unsafe fn encode_row(
    cfg: &RelConfig,
    row: &Deformed,
    key: Option<&[u8]>,
) -> errors::Result<Datum> {
    let mut values = Vec::with_capacity(cfg.columns.len());
    for col in &cfg.columns {
        // SAFETY: forwarded from the caller.
        values.push(unsafe { column_value(col, row, key)? });
    }
    // SAFETY: values follow the builder's columns and types (markers are text).
    Ok(unsafe { cfg.full_row.build(&values) })
}

/// An UPDATE's changed columns (indexes into `cfg.columns`) as jsonb.
///
/// # Safety
/// `row` must be deformed from a tuple of the relation `cfg` describes, still alive.
unsafe fn encode_changed(
    cfg: &RelConfig,
    diff: &[usize],
    row: &Deformed,
    key: Option<&[u8]>,
) -> errors::Result<Datum> {
    let mut values = Vec::with_capacity(diff.len());
    for &i in diff {
        // SAFETY: forwarded from the caller.
        values.push(unsafe { column_value(&cfg.columns[i], row, key)? });
    }
    let hit =
        cfg.changed.borrow().as_ref().filter(|(cols, _)| cols == diff).map(|(_, b)| b.clone());
    let builder = match hit {
        Some(b) => b,
        None => {
            let keys: Vec<&CStr> = diff.iter().map(|&i| cfg.columns[i].name.as_c_str()).collect();
            let types: Vec<pg_sys::Oid> = diff
                .iter()
                .map(|&i| &cfg.columns[i])
                .map(|c| if c.redacted { pg_sys::TEXTOID } else { c.typid })
                .collect();
            // SAFETY: inside the trigger's transaction; keys and types have equal length.
            let b = Rc::new(unsafe { encode::ObjectBuilder::new(&keys, &types) });
            *cfg.changed.borrow_mut() = Some((diff.to_vec(), b.clone()));
            b
        }
    };
    // Not borrowed while building: a user type's cast to json may write to this table again.
    // SAFETY: values follow the builder's columns and types (markers are text).
    Ok(unsafe { builder.build(&values) })
}

/// The key of a tuple as text: the value itself for one column, a JSON array for several.
///
/// # Safety
/// `row` must be deformed from a tuple of the relation `cfg` describes, still alive.
pub(crate) unsafe fn row_key(cfg: &RelConfig, row: &Deformed) -> errors::Result<Option<Vec<u8>>> {
    if cfg.key.is_empty() {
        return Ok(None);
    }
    if let [k] = &cfg.key[..] {
        let (d, isnull) = row.get(k.attnum);
        // SAFETY: a non-null datum of the type whose output function this is; a palloc'd C string.
        return Ok((!isnull).then(|| unsafe {
            CStr::from_ptr(pg_sys::OidOutputFunctionCall(cfg.key_output, d)).to_bytes().to_vec()
        }));
    }
    let vals: Vec<(Datum, bool, pg_sys::Oid)> = cfg
        .key
        .iter()
        .map(|k| {
            let (d, isnull) = row.get(k.attnum);
            (d, isnull, k.typid)
        })
        .collect();
    // SAFETY: valid datums of their types; the array is a fresh jsonb.
    unsafe { jsonb_text(encode::jsonb_array(&vals)) }.map(Some)
}

/// # Safety
/// `td` must be the TriggerData PostgreSQL passed to this trigger call.
unsafe fn capture_event(td: &pg_sys::TriggerData) -> errors::Result<()> {
    let event = td.tg_event;
    let op = event & pg_sys::TRIGGER_EVENT_OPMASK;
    let row_level = event & pg_sys::TRIGGER_EVENT_ROW != 0;
    let operation = match op {
        pg_sys::TRIGGER_EVENT_INSERT => "INSERT",
        pg_sys::TRIGGER_EVENT_DELETE => "DELETE",
        pg_sys::TRIGGER_EVENT_UPDATE => "UPDATE",
        pg_sys::TRIGGER_EVENT_TRUNCATE => "TRUNCATE",
        _ => return Err(AuditError::Internal(format!("unexpected trigger event {event}"))),
    };
    if op != pg_sys::TRIGGER_EVENT_TRUNCATE && !row_level {
        return Err(AuditError::Internal("audit.capture must be a FOR EACH ROW trigger".into()));
    }

    let info = actor::current()?;

    let ext = crate::ext::ext_state()?;
    let rel = td.tg_relation;
    // SAFETY: the trigger's relation is open.
    let cfg = unsafe { cache::rel_config(rel, ext.owner)? };
    let key =
        if cfg.columns.iter().any(|c| c.redacted) { Some(crate::secret::key(&ext)?) } else { None };
    let key = key.as_deref();
    // SAFETY: an open relation's descriptor, valid while the trigger runs.
    let tupdesc = unsafe { (*rel).rd_att };

    let mut row_id = None;
    let mut old_row_id = None;
    let mut old_values: Option<Datum> = None;
    let mut new_values: Option<Datum> = None;
    let mut changed: Option<Vec<&CStr>> = None;

    // SAFETY: tuples belong to the trigger's relation and match its tupdesc.
    unsafe {
        match op {
            pg_sys::TRIGGER_EVENT_INSERT => {
                let new = Deformed::new(td.tg_trigtuple, tupdesc);
                row_id = row_key(&cfg, &new)?;
                new_values = Some(encode_row(&cfg, &new, key)?);
            }
            pg_sys::TRIGGER_EVENT_DELETE => {
                let old = Deformed::new(td.tg_trigtuple, tupdesc);
                row_id = row_key(&cfg, &old)?;
                old_values = Some(encode_row(&cfg, &old, key)?);
            }
            pg_sys::TRIGGER_EVENT_UPDATE => {
                let old = Deformed::new(td.tg_trigtuple, tupdesc);
                let new = Deformed::new(td.tg_newtuple, tupdesc);
                let mut diff: Vec<usize> = Vec::new();
                for (i, col) in cfg.columns.iter().enumerate() {
                    let same = match (old.get(col.attnum), new.get(col.attnum)) {
                        ((_, true), (_, true)) => true,
                        ((a, false), (b, false)) => encode::image_eq(a, b, col.typlen, col.byval),
                        _ => false,
                    };
                    if !same {
                        diff.push(i);
                    }
                }
                if diff.is_empty() {
                    return Ok(()); // nothing tracked changed: no row
                }
                row_id = row_key(&cfg, &new)?;
                let before = row_key(&cfg, &old)?;
                if before != row_id {
                    old_row_id = before;
                }
                changed = Some(diff.iter().map(|&i| cfg.columns[i].name.as_c_str()).collect());
                old_values = Some(encode_changed(&cfg, &diff, &old, key)?);
                // A key that moves is always written whole: time travel follows a
                // key, and the row it left must be complete on its own.
                new_values = Some(
                    if cfg.changes && old_row_id.is_none() && !crate::image::draw_full_image() {
                        encode_changed(&cfg, &diff, &new, key)?
                    } else {
                        encode_row(&cfg, &new, key)?
                    },
                );
            }
            _ => {}
        }
    }

    let row = Row {
        schema: cfg.schema_name.to_bytes(),
        table: cfg.table_name.to_bytes(),
        operation,
        row_id,
        old_row_id,
        old_values,
        new_values,
        changed,
    };
    // SAFETY: the datums were built above as valid jsonb in the current memory context.
    unsafe { append_captured_row(&ext, &info.actor(), row, td) }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn new_values_match_to_jsonb_of_the_row() {
        Spi::run(
            "CREATE EXTENSION IF NOT EXISTS audit_ext;
             CREATE TYPE mood AS ENUM ('ok', 'sad');
             CREATE DOMAIN pos AS int CHECK (VALUE > 0);
             CREATE TABLE every_type (id int PRIMARY KEY, a int[], j jsonb, b bytea, n numeric, f float8,
                 ts timestamptz, m mood, r int4range, d pos, big text, g int GENERATED ALWAYS AS (id * 2) STORED,
                 gone int);
             ALTER TABLE every_type DROP COLUMN gone;
             SELECT audit.track('every_type');
             INSERT INTO every_type (id, a, j, b, n, f, ts, m, r, d, big) VALUES
               (1, '{1,NULL,3}', '{\"k\": [1, \"x\"]}', '\\x00ff', 'NaN', 'Infinity', '-infinity', 'sad',
                '[1,5)', 3, repeat('x', 5000000));",
        )
        .unwrap();
        let same = Spi::get_one::<bool>(
            "SELECT l.new_values = to_jsonb(t) FROM audit.log l, every_type t WHERE l.table_name = 'every_type'",
        )
        .unwrap();
        assert_eq!(same, Some(true));
        // An unchanged 5 MB TOAST value is not a change; a changed one is.
        Spi::run("UPDATE every_type SET n = 1").unwrap();
        let fields = Spi::get_one::<Vec<String>>(
            "SELECT changed_fields FROM audit.log WHERE table_name = 'every_type' ORDER BY id DESC LIMIT 1",
        )
        .unwrap();
        assert_eq!(fields, Some(vec!["n".to_string()]));
        Spi::run("UPDATE every_type SET big = repeat('y', 5000000)").unwrap();
        let fields = Spi::get_one::<Vec<String>>(
            "SELECT changed_fields FROM audit.log WHERE table_name = 'every_type' ORDER BY id DESC LIMIT 1",
        )
        .unwrap();
        assert_eq!(fields, Some(vec!["big".to_string()]));
    }

    #[pg_test]
    fn bulk_update_and_copy_are_captured_with_sane_indexes() {
        Spi::run(
            "CREATE EXTENSION IF NOT EXISTS audit_ext;
             CREATE EXTENSION IF NOT EXISTS amcheck;
             CREATE TABLE bulk (id int PRIMARY KEY, v int);
             SELECT audit.track('bulk');
             INSERT INTO bulk SELECT g, 0 FROM generate_series(1, 100000) g;
             UPDATE bulk SET v = v + 1;",
        )
        .unwrap();
        let n = Spi::get_one::<i64>("SELECT count(*) FROM audit.log WHERE table_name = 'bulk'")
            .unwrap();
        assert_eq!(n, Some(200_000));
        // The log's btree indexes stay consistent (bt_index_check on every partition's index).
        Spi::run(
            "SELECT bt_index_check(i.indexrelid) FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indrelid
              JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
             WHERE h.inhparent = 'audit.log'::regclass AND a.amname = 'btree'",
        )
        .unwrap();
    }
}
