//! audit.log's layout and its writer. The columns, their types and their order
//! are written down once, here (sql/schema.sql creates the table; a test holds
//! the two together). The trigger and DDL recording build a [`Row`],
//! chain::append stamps it with its id and hash, and [`store`] writes it;
//! chain::verify reads the columns back by [`Col`].

/// One log table's layout, written down once: the `Col` enum (with `at()`, a
/// column's index in a row of values), `NCOLS`, `COLUMN_NAMES`, `COLUMN_TYPES`
/// in table order, and the SELECT of every column and the INSERT of one row.
macro_rules! layout {
    ($table:literal; $($col:ident = $name:literal : $typ:ident),* $(,)?) => {
        /// The table's columns, in table order.
        #[derive(Clone, Copy)]
        pub enum Col { $($col),* }
        impl Col {
            /// The column's index in a row of [`NCOLS`] values.
            pub const fn at(self) -> usize {
                self as usize
            }
        }
        /// How many columns the table has.
        pub const NCOLS: usize = [$(Col::$col),*].len();
        /// Their names, in table order.
        pub const COLUMN_NAMES: [&str; NCOLS] = [$($name),*];
        /// Their types, in table order.
        pub const COLUMN_TYPES: [pgrx::pg_sys::Oid; NCOLS] = [$(pgrx::pg_sys::$typ),*];
        /// `SELECT <every column, in table order> FROM <table>`: a scan hands each
        /// stored tuple over as it is, with no projection.
        pub fn select_all_sql() -> std::ffi::CString {
            let sql = format!("SELECT {} FROM {}", COLUMN_NAMES.join(", "), $table);
            std::ffi::CString::new(sql).expect("column names hold no NUL")
        }
        /// The INSERT of one row, every column a parameter, in table order.
        pub fn insert_sql() -> std::ffi::CString {
            let params: Vec<String> = (1..=NCOLS).map(|i| format!("${i}")).collect();
            let sql = format!(
                "INSERT INTO {} ({}) VALUES ({})",
                $table,
                COLUMN_NAMES.join(", "),
                params.join(", ")
            );
            std::ffi::CString::new(sql).expect("column names hold no NUL")
        }
    };
}

pub mod access;
pub mod batch;
pub mod sink;

use std::cell::Cell;
use std::ffi::{c_char, CStr, CString};

use pgrx::pg_sys::{self, Datum, Oid};

use crate::datum::{text_array, text_datum};
use crate::errors::{AuditError, Result};
use crate::ext::ExtState;

/// Microseconds between the Unix epoch (1970-01-01, the row hash's) and
/// PostgreSQL's (2000-01-01, a timestamptz datum's).
pub const PG_EPOCH_OFFSET_US: i64 =
    (pg_sys::POSTGRES_EPOCH_JDATE - pg_sys::UNIX_EPOCH_JDATE) as i64 * 86_400 * 1_000_000;

layout! {
    "audit.log";
    Id = "id": INT8OID,
    ChangedAt = "changed_at": TIMESTAMPTZOID,
    Txid = "txid": INT8OID,
    SchemaName = "schema_name": TEXTOID,
    TableName = "table_name": TEXTOID,
    Operation = "operation": TEXTOID,
    RowId = "row_id": TEXTOID,
    OldRowId = "old_row_id": TEXTOID,
    OldValues = "old_values": JSONBOID,
    NewValues = "new_values": JSONBOID,
    ChangedFields = "changed_fields": TEXTARRAYOID,
    ChangedBy = "changed_by": TEXTOID,
    DbUser = "db_user": TEXTOID,
    SessionInfo = "session_info": JSONBOID,
    RowHash = "row_hash": BYTEAOID,
}

/// Every chained row's (id, row_hash), as a relation for a FROM clause: the
/// changes, and the reads once the schema has audit.access_log (`current`).
pub fn chained_rows(current: bool) -> &'static str {
    if current {
        "(SELECT id, row_hash FROM audit.log UNION ALL SELECT id, row_hash FROM audit.access_log) AS chained"
    } else {
        "audit.log"
    }
}

/// Who made a change, as stored and hashed (bytes in the database encoding).
pub struct Actor<'a> {
    pub changed_by: &'a [u8],
    pub db_user: &'a [u8],
    /// session_info as a jsonb datum, and its text (which the hash covers).
    pub session_info: Datum,
    pub session_text: &'a [u8],
}

/// One audit row, before id, time, txid and hash are added. Text is bytes in
/// the database encoding: what is stored is exactly what the row hash covers.
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

thread_local! {
    /// The kept plan of the INSERT fallback, prepared at its first use.
    static PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

/// What chain::append adds to a [`Row`] before it is stored.
pub struct Stamp<'a> {
    pub id: i64,
    pub changed_at: pg_sys::TimestampTz,
    pub txid: i64,
    pub row_hash: &'a [u8],
}

/// How [`store`] writes a row.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Now, as the next statement of this transaction may read it.
    Now,
    /// Possibly kept for one multi-insert with the statement's other rows
    /// (log::batch decided that nothing can look before the statement's end).
    Batched,
}

/// Stores one row. The caller runs as the extension owner.
///
/// # Safety
/// `old_values`, `new_values` and `actor.session_info` must be valid jsonb datums.
pub unsafe fn store(
    ext: &ExtState,
    actor: &Actor,
    row: &Row,
    stamp: &Stamp,
    write: Write,
) -> Result<()> {
    let mut vals: [Option<Datum>; NCOLS] = [None; NCOLS];
    // SAFETY: text_datum and text_array build fresh datums in the current memory context.
    unsafe {
        let text = |s: Option<&[u8]>| s.map(|s| text_datum(s));
        vals[Col::Id.at()] = Some(Datum::from(stamp.id));
        vals[Col::ChangedAt.at()] = Some(Datum::from(stamp.changed_at));
        vals[Col::Txid.at()] = Some(Datum::from(stamp.txid));
        vals[Col::SchemaName.at()] = text(Some(row.schema));
        vals[Col::TableName.at()] = text(Some(row.table));
        vals[Col::Operation.at()] = text(Some(row.operation.as_bytes()));
        vals[Col::RowId.at()] = text(row.row_id.as_deref());
        vals[Col::OldRowId.at()] = text(row.old_row_id.as_deref());
        vals[Col::ChangedFields.at()] = row.changed.as_ref().map(|v| text_array(v));
        vals[Col::ChangedBy.at()] = text(Some(actor.changed_by));
        vals[Col::DbUser.at()] = text(Some(actor.db_user));
        vals[Col::RowHash.at()] = Some(text_datum(stamp.row_hash));
    }
    vals[Col::OldValues.at()] = row.old_values;
    vals[Col::NewValues.at()] = row.new_values;
    vals[Col::SessionInfo.at()] = Some(actor.session_info);
    let values = vals.map(|v| v.unwrap_or(Datum::from(0)));
    let nulls = vals.map(|v| v.is_none());

    // SAFETY: values hold audit.log's columns in table order, of COLUMN_TYPES.
    let done = unsafe {
        match write {
            Write::Now => sink::insert(ext.log, ext.log_default, &values, &nulls),
            Write::Batched => sink::insert_buffered(ext.log, ext.log_default, &values, &nulls),
        }
    };
    if done {
        return Ok(());
    }
    // The executor's INSERT routes the row itself: take the parent and the default
    // partition first, in maintain()'s order, for the reason sink::open gives.
    // SAFETY: plain lock acquisitions, held until the transaction ends.
    unsafe {
        pg_sys::LockRelationOid(ext.log, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        pg_sys::LockRelationOid(ext.log_default, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    }
    // SAFETY: values hold audit.log's columns in table order, of COLUMN_TYPES.
    unsafe { insert_row(&values, &nulls) }
}

/// The plain INSERT, for a partition the sink cannot write directly.
///
/// # Safety
/// `values` must be audit.log's columns in table order, of COLUMN_TYPES.
unsafe fn insert_row(values: &[Datum; NCOLS], nulls: &[bool; NCOLS]) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { insert_kept(&PLAN, insert_sql, &COLUMN_TYPES, values, nulls) }
}

/// Runs an INSERT with every column a parameter through a plan kept in `plan`
/// (prepared at its first use from `sql()`).
///
/// # Safety
/// `values` must be of `types`, which are the INSERT's parameter types.
pub(crate) unsafe fn insert_kept(
    plan: &'static std::thread::LocalKey<Cell<pg_sys::SPIPlanPtr>>,
    sql: impl FnOnce() -> CString,
    types: &[Oid],
    values: &[Datum],
    nulls: &[bool],
) -> Result<()> {
    let nulls: Vec<c_char> =
        nulls.iter().map(|&n| if n { b'n' as c_char } else { b' ' as c_char }).collect();
    // SAFETY: SPI calls are balanced; on ERROR, transaction abort cleans up SPI state.
    // The plan's parameter types are `types`, which the values match (caller's contract).
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            return Err(AuditError::Internal("SPI_connect failed".into()));
        }
        let mut kept = plan.with(|p| p.get());
        if kept.is_null() {
            let mut types = types.to_vec();
            let sql = sql();
            kept = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
            if kept.is_null() || pg_sys::SPI_keepplan(kept) != 0 {
                return Err(AuditError::Internal(format!("could not prepare {sql:?}")));
            }
            plan.with(|p| p.set(kept));
        }
        let rc =
            pg_sys::SPI_execute_plan(kept, values.as_ptr().cast_mut(), nulls.as_ptr(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            return Err(AuditError::Internal(format!("an audit insert failed: SPI code {rc}")));
        }
        pg_sys::SPI_finish();
    }
    Ok(())
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// A table's columns as the catalog has them: (name, type), in order.
    fn columns_of(table: &str) -> Vec<(String, pg_sys::Oid)> {
        Spi::connect(|c| {
            c.select(
                "SELECT attname::text, atttypid FROM pg_attribute
                  WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                None,
                &[table.into()],
            )
            .unwrap()
            .map(|r| {
                (r.get::<String>(1).unwrap().unwrap(), r.get::<pg_sys::Oid>(2).unwrap().unwrap())
            })
            .collect()
        })
    }

    /// sql/schema.sql creates both logs; this module and log::access describe
    /// them. They must agree.
    #[pg_test]
    fn the_layouts_are_the_tables() {
        Spi::run("CREATE EXTENSION IF NOT EXISTS audit_ext").unwrap();
        let names = |n: &[&str]| n.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let ours: Vec<_> =
            names(&super::COLUMN_NAMES).into_iter().zip(super::COLUMN_TYPES).collect();
        assert_eq!(columns_of("audit.log"), ours);
        let ours: Vec<_> = names(&super::access::COLUMN_NAMES)
            .into_iter()
            .zip(super::access::COLUMN_TYPES)
            .collect();
        assert_eq!(columns_of("audit.access_log"), ours);
        assert_eq!(super::PG_EPOCH_OFFSET_US, 946_684_800_000_000);
    }
}
