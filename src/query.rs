//! Read-only SPI queries. pgrx's `Spi::get_one` and friends run in read-write
//! mode, which first gives the transaction an xid: a standby refuses that
//! ("cannot assign TransactionIds during recovery"), and on a primary it costs
//! a commit record. Everything that only reads goes through here.

use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::spi::{self, Spi};

/// The first column of the first row, or None.
pub fn one<A: FromDatum + IntoDatum>(query: &str) -> spi::Result<Option<A>> {
    one_with_args(query, &[])
}

pub fn one_with_args<A: FromDatum + IntoDatum>(
    query: &str,
    args: &[DatumWithOid<'_>],
) -> spi::Result<Option<A>> {
    Spi::connect(|client| client.select(query, Some(1), args)?.first().get_one())
}

/// Refuses a writing function on a standby with PostgreSQL's own error
/// (25006, "cannot execute audit.seal() during recovery"), before any work.
pub fn refuse_during_recovery(what: &std::ffi::CStr) {
    // SAFETY: a plain check; it raises an ERROR (a Rust panic here) during recovery.
    unsafe { pgrx::pg_sys::PreventCommandDuringRecovery(what.as_ptr()) }
}
