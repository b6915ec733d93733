//! Capture: the native row and TRUNCATE trigger that writes `audit.log`.

pub mod actor;
pub mod cache;
pub mod encode;
pub mod sink;

use std::cell::Cell;
use std::ffi::{c_char, CStr};
use std::rc::Rc;

use pgrx::pg_sys::{self, Datum};
use pgrx::prelude::*;

use crate::chain::hash::{self, RowFields};
use crate::errors::Result as AResult;
use crate::errors::{AuditError, OrRaise};
use crate::privilege::AsOwner;
use cache::{Column, RelConfig};

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

const INSERT_SQL: &CStr = c"INSERT INTO audit.log (id, changed_at, txid, schema_name, table_name, operation, \
row_id, old_row_id, old_values, new_values, changed_fields, changed_by, db_user, session_info, row_hash) \
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)";
const NPARAMS: usize = 15;

/// The types of audit.log's columns, in column order (INSERT_SQL's order).
pub const LOG_COLUMN_TYPES: [pg_sys::Oid; NPARAMS] = [
    pg_sys::INT8OID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::INT8OID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::JSONBOID,
    pg_sys::JSONBOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::JSONBOID,
    pg_sys::BYTEAOID,
];

thread_local! {
    static PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static SECRET: std::cell::RefCell<Option<Rc<[u8]>>> = const { std::cell::RefCell::new(None) };
}

#[pg_trigger]
fn capture<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> core::result::Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, AuditError> {
    // SAFETY: PostgreSQL hands us a valid TriggerData for the duration of the call.
    unsafe { capture_event(trigger.trigger_data()) }.or_raise();
    Ok(None)
}

/// The per-database redaction key, read once per backend as the extension owner.
pub fn secret(owner: pg_sys::Oid) -> AResult<Rc<[u8]>> {
    if let Some(s) = SECRET.with(|s| s.borrow().clone()) {
        return Ok(s);
    }
    let key = {
        let _owner = AsOwner::enter(owner);
        crate::query::one::<Vec<u8>>("SELECT (SELECT key FROM audit.secret LIMIT 1)")?
    }
    .ok_or_else(|| AuditError::Internal("audit.secret is empty; run audit.track() again".into()))?;
    let key: Rc<[u8]> = key.into();
    SECRET.with(|s| *s.borrow_mut() = Some(key.clone()));
    Ok(key)
}

pub fn forget_secret() {
    SECRET.with(|s| *s.borrow_mut() = None);
}

/// A tuple's columns, deformed once: reading 15 columns one by one with
/// heap_getattr walks the tuple again for each column after the first varlena.
struct Deformed {
    values: Vec<Datum>,
    nulls: Vec<bool>,
}

impl Deformed {
    /// # Safety
    /// `tuple` must match `tupdesc`; the datums point into it and live as long as it does.
    unsafe fn new(tuple: pg_sys::HeapTuple, tupdesc: pg_sys::TupleDesc) -> Deformed {
        // SAFETY: tupdesc is the relation's; the arrays hold natts entries.
        unsafe {
            let natts = (*tupdesc).natts as usize;
            let mut d = Deformed { values: vec![Datum::from(0); natts], nulls: vec![false; natts] };
            pg_sys::heap_deform_tuple(tuple, tupdesc, d.values.as_mut_ptr(), d.nulls.as_mut_ptr());
            d
        }
    }

    fn get(&self, attnum: i32) -> (Datum, bool) {
        let i = attnum as usize - 1;
        (self.values[i], self.nulls[i])
    }
}

/// The value stored for one column: redacted columns become their HMAC marker.
/// Runs as the caller: output functions are user code.
unsafe fn column_value(col: &Column, row: &Deformed, key: Option<&[u8]>) -> AResult<(Datum, bool)> {
    let (d, isnull) = row.get(col.attnum);
    if col.redacted && !isnull {
        let key =
            key.ok_or_else(|| AuditError::Internal("redacted column without a key".into()))?;
        // SAFETY: non-null datum of the column's type.
        let text = unsafe { encode::output_bytes(d, col.typid) };
        let marker = hash::redaction_marker(key, &text);
        // SAFETY: a fresh text datum in the current memory context.
        return Ok((unsafe { encode::text_datum(marker.as_bytes()) }, false));
    }
    Ok((d, isnull))
}

/// The whole tracked row as jsonb, through the relation's prepared builder.
unsafe fn encode_row(cfg: &RelConfig, row: &Deformed, key: Option<&[u8]>) -> AResult<Datum> {
    let mut values = Vec::with_capacity(cfg.columns.len());
    for col in &cfg.columns {
        // SAFETY: forwarded from the caller.
        values.push(unsafe { column_value(col, row, key)? });
    }
    // SAFETY: values follow the builder's columns and types (markers are text).
    Ok(unsafe { cfg.full_row.build(&values) })
}

/// An UPDATE's changed columns (indexes into `cfg.columns`) as jsonb.
unsafe fn encode_changed(
    cfg: &RelConfig,
    diff: &[usize],
    row: &Deformed,
    key: Option<&[u8]>,
) -> AResult<Datum> {
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
unsafe fn row_key(cfg: &RelConfig, row: &Deformed) -> AResult<Option<Vec<u8>>> {
    if cfg.key.is_empty() {
        return Ok(None);
    }
    if let [(attnum, _)] = cfg.key[..] {
        let (d, isnull) = row.get(attnum);
        // SAFETY: a non-null datum of the type whose output function this is; a palloc'd C string.
        return Ok((!isnull).then(|| unsafe {
            CStr::from_ptr(pg_sys::OidOutputFunctionCall(cfg.key_output, d)).to_bytes().to_vec()
        }));
    }
    let vals: Vec<(Datum, bool, pg_sys::Oid)> = cfg
        .key
        .iter()
        .map(|&(attnum, typid)| {
            let (d, isnull) = row.get(attnum);
            (d, isnull, typid)
        })
        .collect();
    // SAFETY: valid datums of their types; the array is a fresh jsonb.
    unsafe { hash_text(encode::jsonb_array(&vals)) }.map(Some)
}

unsafe fn capture_event(td: &pg_sys::TriggerData) -> AResult<()> {
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

    let ext = cache::ext_state()?;
    let rel = td.tg_relation;
    // SAFETY: the trigger's relation is open.
    let cfg = unsafe { cache::rel_config(rel, ext.owner)? };
    let key = if cfg.columns.iter().any(|c| c.redacted) { Some(secret(ext.owner)?) } else { None };
    let key = key.as_deref();
    // SAFETY: as above.
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
                new_values = Some(encode_row(&cfg, &new, key)?);
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
    unsafe { write_row(&ext, &info, row) }
}

/// One audit row, before ids, time and hash are added. Text is bytes in the
/// database encoding: what is stored is exactly what the row hash covers.
pub struct Row<'a> {
    pub schema: &'a [u8],
    pub table: &'a [u8],
    pub operation: &'a str,
    pub row_id: Option<Vec<u8>>,
    pub old_row_id: Option<Vec<u8>>,
    pub old_values: Option<Datum>,
    pub new_values: Option<Datum>,
    pub changed: Option<Vec<&'a CStr>>,
}

/// Adds id, time, txid and hash, and inserts the row as the extension owner.
///
/// # Safety
/// `old_values` and `new_values` must be valid jsonb datums.
pub unsafe fn write_row(ext: &cache::ExtState, info: &actor::SessionInfo, row: Row) -> AResult<()> {
    let db_user = info.db_user();
    let Row { schema, table, operation, row_id, old_row_id, old_values, new_values, changed } = row;
    // SAFETY: plain accessors of transaction state.
    let (txid, changed_at) = unsafe {
        (
            pg_sys::GetTopFullTransactionId().value as i64,
            pg_sys::GetCurrentTransactionStartTimestamp(),
        )
    };
    // From here on only the extension's own objects are touched, and no SQL is planned.
    let _owner = AsOwner::enter_for_row_write(ext.owner);
    // Before the id: the sealer must see that this transaction holds one.
    crate::chain::writers::mark_current_transaction(ext.ext);
    // SAFETY: nextval_oid takes the sequence's oid; we run as its owner.
    let id = unsafe {
        pgrx::direct_function_call::<i64>(pg_sys::nextval_oid, &[Some(Datum::from(ext.seq))])
    }
    .ok_or_else(|| AuditError::Internal("nextval returned NULL".into()))?;

    // SAFETY: the datums were just built as valid jsonb.
    let old_text = old_values.map(|d| unsafe { hash_text(d) }).transpose()?;
    let new_text = new_values.map(|d| unsafe { hash_text(d) }).transpose()?;
    let fields = RowFields {
        id,
        changed_at_us: changed_at + PG_EPOCH_OFFSET_US,
        txid,
        schema_name: schema,
        table_name: table,
        operation: operation.as_bytes(),
        row_id: row_id.as_deref(),
        old_values: old_text.as_deref(),
        new_values: new_text.as_deref(),
        changed_fields: changed.as_ref().map(|v| v.iter().map(|c| Some(c.to_bytes())).collect()),
        changed_by: &info.changed_by,
        db_user,
        session_info: Some(info.text()),
        old_row_id: old_row_id.as_deref(),
    };
    let digest = hash::row_hash(&fields);

    // SAFETY: builds fresh datums in the current memory context.
    let (values, nulls) = unsafe {
        let text = |s: Option<&[u8]>| s.map(|s| encode::text_datum(s));
        let vals: [Option<Datum>; NPARAMS] = [
            Some(Datum::from(id)),
            Some(Datum::from(changed_at)),
            Some(Datum::from(txid)),
            text(Some(schema)),
            text(Some(table)),
            text(Some(operation.as_bytes())),
            text(row_id.as_deref()),
            text(old_row_id.as_deref()),
            old_values,
            new_values,
            changed.as_ref().map(|v| encode::text_array(v)),
            text(Some(&info.changed_by)),
            text(Some(db_user)),
            Some(info.datum()),
            Some(encode::text_datum(&digest)),
        ];
        (vals.map(|v| v.unwrap_or(Datum::from(0))), vals.map(|v| v.is_none()))
    };
    // SAFETY: values match audit.log's columns (the INSERT_SQL order is the table's).
    if unsafe { sink::insert(ext.log, ext.log_default, &values, &nulls) } {
        return Ok(());
    }
    // The executor's INSERT routes the row itself: take the parent and the default
    // partition first, in maintain()'s order, for the reason sink::open gives.
    // SAFETY: plain lock acquisitions, held until the transaction ends.
    unsafe {
        pg_sys::LockRelationOid(ext.log, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        pg_sys::LockRelationOid(ext.log_default, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    }
    // SAFETY: a standard SPI session around one execution of the kept plan.
    unsafe { insert_row(&values, &nulls) }
}

/// The jsonb's text as `jsonb_out` writes it, which is what the row hash covers.
///
/// # Safety
/// `d` must be a valid jsonb datum.
unsafe fn hash_text(d: Datum) -> AResult<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    // SAFETY: forwarded.
    unsafe { crate::chain::jsonb_text::datum_text(d, &mut buf) }.map_err(AuditError::Internal)?;
    Ok(buf)
}

unsafe fn insert_row(values: &[Datum; NPARAMS], nulls: &[bool; NPARAMS]) -> AResult<()> {
    let nulls: [c_char; NPARAMS] = nulls.map(|n| if n { b'n' as c_char } else { b' ' as c_char });
    // SAFETY: SPI calls are balanced; on ERROR, transaction abort cleans up SPI state.
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            return Err(AuditError::Internal("SPI_connect failed".into()));
        }
        let mut plan = PLAN.with(|p| p.get());
        if plan.is_null() {
            let mut types = LOG_COLUMN_TYPES;
            plan = pg_sys::SPI_prepare(INSERT_SQL.as_ptr(), NPARAMS as i32, types.as_mut_ptr());
            if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                return Err(AuditError::Internal("could not prepare the audit.log insert".into()));
            }
            PLAN.with(|p| p.set(plan));
        }
        let rc =
            pg_sys::SPI_execute_plan(plan, values.as_ptr().cast_mut(), nulls.as_ptr(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            return Err(AuditError::Internal(format!("audit.log insert failed: SPI code {rc}")));
        }
        pg_sys::SPI_finish();
    }
    Ok(())
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
