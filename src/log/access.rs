//! audit.access_log's layout: its columns, in table order, with their types
//! (sql/schema.sql creates the table; a test holds the two together).

use pgrx::pg_sys;

layout! {
    "audit.access_log";
    Id = "id": INT8OID,
    AccessedAt = "accessed_at": TIMESTAMPTZOID,
    SchemaName = "schema_name": TEXTOID,
    TableName = "table_name": TEXTOID,
    Command = "command": TEXTOID,
    Columns = "columns": TEXTARRAYOID,
    Rows = "rows": INT8OID,
    Outcome = "outcome": TEXTOID,
    Sqlstate = "sqlstate": TEXTOID,
    AccessedBy = "accessed_by": TEXTOID,
    DbUser = "db_user": TEXTOID,
    Role = "role": TEXTOID,
    Txid = "txid": INT8OID,
    SessionInfo = "session_info": JSONBOID,
    QueryId = "query_id": INT8OID,
    Statement = "statement": TEXTOID,
    Parameters = "parameters": JSONBOID,
    BackendPid = "backend_pid": INT4OID,
    RowHash = "row_hash": BYTEAOID,
}

/// One audit.access_log row, before its id and hash. Text is bytes in the
/// database encoding; jsonb values are datums.
pub struct AccessRow<'a> {
    pub accessed_at: pg_sys::TimestampTz,
    pub schema: &'a [u8],
    pub table: &'a [u8],
    pub command: &'a [u8],
    pub columns: Option<&'a [Vec<u8>]>,
    pub rows: Option<i64>,
    pub outcome: &'a [u8],
    pub sqlstate: Option<Vec<u8>>,
    pub accessed_by: &'a [u8],
    pub db_user: &'a [u8],
    pub role: &'a [u8],
    pub txid: Option<i64>,
    /// The jsonb datum, and its text as `jsonb_out` writes it (what the row hash covers):
    /// a session's rows share both, so the worker makes them once per batch.
    pub session_info: Option<(pg_sys::Datum, &'a [u8])>,
    pub query_id: Option<i64>,
    pub statement: Option<Vec<u8>>,
    pub parameters: Option<pg_sys::Datum>,
    pub backend_pid: i32,
}

thread_local! {
    static PLAN: std::cell::Cell<pg_sys::SPIPlanPtr> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// Inserts one row (the caller runs as the extension owner, inside SPI-less code).
///
/// # Safety
/// The jsonb datums of `row` must be valid.
pub unsafe fn store(
    ext: &crate::ext::ExtState,
    row: &AccessRow,
    id: i64,
    row_hash: &[u8],
) -> crate::errors::Result<()> {
    use crate::datum::text_datum;
    use pg_sys::Datum;
    let mut vals: [Option<Datum>; NCOLS] = [None; NCOLS];
    // SAFETY: fresh datums in the current memory context.
    unsafe {
        let text = |s: Option<&[u8]>| s.map(|s| text_datum(s));
        vals[Col::Id.at()] = Some(Datum::from(id));
        vals[Col::AccessedAt.at()] = Some(Datum::from(row.accessed_at));
        vals[Col::SchemaName.at()] = text(Some(row.schema));
        vals[Col::TableName.at()] = text(Some(row.table));
        vals[Col::Command.at()] = text(Some(row.command));
        vals[Col::Columns.at()] = row.columns.map(|cols| {
            let names: Vec<std::ffi::CString> = cols
                .iter()
                .map(|c| std::ffi::CString::new(c.clone()).unwrap_or_default())
                .collect();
            let refs: Vec<&std::ffi::CStr> = names.iter().map(|c| c.as_c_str()).collect();
            crate::datum::text_array(&refs)
        });
        vals[Col::Rows.at()] = row.rows.map(Datum::from);
        vals[Col::Outcome.at()] = text(Some(row.outcome));
        vals[Col::Sqlstate.at()] = text(row.sqlstate.as_deref());
        vals[Col::AccessedBy.at()] = text(Some(row.accessed_by));
        vals[Col::DbUser.at()] = text(Some(row.db_user));
        vals[Col::Role.at()] = text(Some(row.role));
        vals[Col::Txid.at()] = row.txid.map(Datum::from);
        vals[Col::SessionInfo.at()] = row.session_info.map(|(d, _)| d);
        vals[Col::QueryId.at()] = row.query_id.map(Datum::from);
        vals[Col::Statement.at()] = text(row.statement.as_deref());
        vals[Col::Parameters.at()] = row.parameters;
        vals[Col::BackendPid.at()] = Some(Datum::from(row.backend_pid));
        vals[Col::RowHash.at()] = Some(text_datum(row_hash));
    }
    let values = vals.map(|v| v.unwrap_or(Datum::from(0)));
    let nulls = vals.map(|v| v.is_none());
    // Straight into the partition, as the trigger writes audit.log, a batch of rows in
    // one multi-insert (the worker flushes at the end of its batch); the executor's
    // INSERT when the partition needs it (see log::sink).
    // SAFETY: values hold audit.access_log's columns in table order, of COLUMN_TYPES.
    if unsafe {
        super::sink::insert_buffered(ext.access_log, ext.access_log_default, &values, &nulls)
    } {
        return Ok(());
    }
    // The executor routes the row itself: the parent and the default partition first,
    // in maintain()'s order, for the reason log::sink gives.
    // SAFETY: plain lock acquisitions, held until the transaction ends.
    unsafe {
        pg_sys::LockRelationOid(ext.access_log, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        pg_sys::LockRelationOid(
            ext.access_log_default,
            pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
        );
    }
    // SAFETY: values hold audit.access_log's columns in table order, of COLUMN_TYPES.
    unsafe { super::insert_kept(&PLAN, insert_sql, &COLUMN_TYPES, &values, &nulls) }
}
