//! Appending a row to the chain: the row gets its id (after the writer is
//! marked, so that seal() waits for this transaction), its time and
//! transaction, and its hash over exactly the bytes that are stored.

use pgrx::pg_sys::{self, Datum};

use crate::chain::hash::{self, RowFields};
use crate::errors::{AuditError, Result};
use crate::ext::ExtState;
use crate::log::{self, Actor, Row, Stamp, Write, PG_EPOCH_OFFSET_US};
use crate::privilege::AsOwner;

/// Stamps `row` with id, time, txid and hash, and stores it as the extension owner,
/// at once.
///
/// # Safety
/// `old_values`, `new_values` and `actor.session_info` must be valid jsonb datums.
pub unsafe fn append_row(ext: &ExtState, actor: &Actor, row: Row) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { append(ext, actor, row, Write::Now) }
}

/// [`append_row`] for a writer that writes many rows in one go (audit.baseline):
/// the row may be kept and written with the next ones in one multi-insert. The
/// caller writes what is kept with `log::sink::flush` before anything reads the
/// log; a transaction that aborts forgets it.
///
/// # Safety
/// As [`append_row`].
pub unsafe fn append_kept_row(ext: &ExtState, actor: &Actor, row: Row) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { append(ext, actor, row, Write::Batched) }
}

/// [`append_row`] for the capture trigger: the row may be written with the
/// statement's others in one multi-insert, when log::batch finds that nothing
/// can look at the log before the statement ends. Its id is drawn now, so ids
/// keep the order of the changes.
///
/// # Safety
/// As [`append_row`]; `td` must be the TriggerData of the running trigger call.
pub unsafe fn append_captured_row(
    ext: &ExtState,
    actor: &Actor,
    row: Row,
    td: &pg_sys::TriggerData,
) -> Result<()> {
    // SAFETY: the trigger's relation is open and its Trigger valid while it runs.
    let keep = unsafe { log::batch::may_keep(td.tg_relation, (*td.tg_trigger).tgfoid) };
    let write = if keep { Write::Batched } else { Write::Now };
    // SAFETY: forwarded from the caller.
    unsafe { append(ext, actor, row, write) }
}

/// # Safety
/// As [`append_row`].
unsafe fn append(ext: &ExtState, actor: &Actor, row: Row, write: Write) -> Result<()> {
    // SAFETY: plain accessors of transaction state.
    let (txid, changed_at) = unsafe {
        (
            pg_sys::GetTopFullTransactionId().value as i64,
            pg_sys::GetCurrentTransactionStartTimestamp(),
        )
    };
    // From here on only the extension's own objects are touched, and no SQL is planned.
    let _owner = AsOwner::enter_for_row_write(ext.owner);
    let id = next_id(ext)?;

    // SAFETY: the caller passes valid jsonb datums.
    let old_text = row.old_values.map(|d| unsafe { jsonb_text(d) }).transpose()?;
    // SAFETY: as for old_text, the caller passes a valid jsonb datum.
    let new_text = row.new_values.map(|d| unsafe { jsonb_text(d) }).transpose()?;
    let fields = RowFields {
        id,
        changed_at_us: changed_at + PG_EPOCH_OFFSET_US,
        txid,
        schema_name: row.schema,
        table_name: row.table,
        operation: row.operation.as_bytes(),
        row_id: row.row_id.as_deref(),
        old_values: old_text.as_deref(),
        new_values: new_text.as_deref(),
        changed_fields: row
            .changed
            .as_ref()
            .map(|v| v.iter().map(|c| Some(c.to_bytes())).collect()),
        changed_by: actor.changed_by,
        db_user: actor.db_user,
        session_info: Some(actor.session_text),
        old_row_id: row.old_row_id.as_deref(),
    };
    let row_hash = hash::row_hash(&fields);
    let stamp = Stamp { id, changed_at, txid, row_hash: &row_hash };
    // SAFETY: forwarded from the caller.
    unsafe { log::store(ext, actor, &row, &stamp, write) }
}

// commands/sequence.h, which pgrx does not bind.
unsafe extern "C-unwind" {
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// The next id of the chain (the caller runs as the extension owner). The
/// transaction is marked a writer first: the sealer must see that it holds one.
fn next_id(ext: &ExtState) -> Result<i64> {
    crate::chain::writers::mark_current_transaction(ext.ext);
    // SAFETY: the sequence's oid; behind pgrx's guard, which turns an ERROR into a
    // panic. nextval() itself without its call overhead and its privilege check,
    // which the sequence's owner, as whom we run, passes anyway; the read-only
    // and parallel-mode checks stay.
    Ok(unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(ext.seq, false)) })
}

/// The jsonb's text as `jsonb_out` writes it, which is what the row hash covers.
///
/// # Safety
/// `d` must be a valid jsonb datum.
pub unsafe fn jsonb_text(d: Datum) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    // SAFETY: d is a valid jsonb datum (caller's contract).
    unsafe { crate::chain::jsonb_text::datum_text(d, &mut buf) }.map_err(AuditError::Internal)?;
    Ok(buf)
}

/// Stamps a read record's row with its id and hash, and stores it (the worker,
/// as the extension owner).
///
/// # Safety
/// The jsonb datums of `row` must be valid.
pub unsafe fn append_access(ext: &ExtState, row: &crate::log::access::AccessRow) -> Result<i64> {
    let _owner = AsOwner::enter_for_row_write(ext.owner);
    let id = next_id(ext)?;
    // SAFETY: the caller passes valid jsonb datums.
    let params = row.parameters.map(|d| unsafe { jsonb_text(d) }).transpose()?;
    let fields = hash::AccessFields {
        id,
        accessed_at_us: row.accessed_at + PG_EPOCH_OFFSET_US,
        schema_name: row.schema,
        table_name: row.table,
        command: row.command,
        columns: row.columns.map(|c| c.iter().map(|n| Some(n.as_slice())).collect()),
        rows: row.rows,
        outcome: row.outcome,
        sqlstate: row.sqlstate.as_deref(),
        accessed_by: row.accessed_by,
        db_user: row.db_user,
        role: row.role,
        txid: row.txid,
        session_info: row.session_info.map(|(_, text)| text),
        query_id: row.query_id,
        statement: row.statement.as_deref(),
        parameters: params.as_deref(),
        backend_pid: i64::from(row.backend_pid),
    };
    let row_hash = hash::access_hash(&fields);
    // SAFETY: forwarded from the caller.
    unsafe { crate::log::access::store(ext, row, id, &row_hash) }?;
    Ok(id)
}
