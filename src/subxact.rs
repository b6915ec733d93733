//! Running a piece of work in an internal subtransaction, so that an ERROR in it
//! can be caught: the subtransaction is rolled back (releasing its locks and
//! undoing its writes), and the caller goes on in the outer transaction.

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

/// What a caught error says: its SQLSTATE and message.
#[derive(Debug, Clone)]
pub struct Caught {
    pub code: PgSqlErrorCode,
    pub message: String,
}

impl Caught {
    fn from(e: &CaughtError) -> Caught {
        match e {
            CaughtError::PostgresError(r)
            | CaughtError::ErrorReport(r)
            | CaughtError::RustPanic { ereport: r, .. } => {
                Caught { code: r.sql_error_code(), message: r.message().to_string() }
            }
        }
    }
}

/// Runs `f` in a subtransaction. An ERROR for which `catch` says yes rolls the
/// subtransaction back and comes back as `Err`; any other is raised as it was.
pub fn run<R>(
    f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
    catch: impl Fn(&Caught) -> bool + std::panic::RefUnwindSafe,
) -> Result<R, Caught> {
    // SAFETY: the standard internal-subtransaction pattern (as PL/pgSQL's exception
    // blocks): memory context and resource owner are restored on both paths, and the
    // error is taken off the error stack before the rollback.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        PgTryBuilder::new(move || {
            let r = f();
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
            Ok(r)
        })
        .catch_others(|e| {
            // Always roll the subtransaction back first, as PL/pgSQL does: an ERROR
            // that leaves an internal subtransaction open would leave the session in
            // an aborted transaction block, even outside BEGIN.
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
            let caught = Caught::from(&e);
            if !catch(&caught) {
                e.rethrow()
            }
            Err(caught)
        })
        .execute()
    }
}
