//! Every error the extension raises, and the one place that maps them to SQLSTATEs.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("argument \"{0}\" must not be NULL")]
    NullArgument(&'static str),
    #[error("column \"{column}\" of relation \"{table}\" does not exist")]
    UnknownColumn { table: String, column: String },
    #[error("column \"{column}\" cannot be both excluded and redacted")]
    ExcludedAndRedacted { column: String },
    #[error(
        "\"{table}\" is not a table: audit.track works on ordinary and partitioned tables only"
    )]
    WrongObjectType { table: String },
    #[error("\"{table}\" cannot be tracked: {why}")]
    NotTrackable { table: String, why: &'static str },
    #[error("must be owner of table {table}")]
    NotOwner { table: String },
    #[error("permission denied for table {table}: audit_ext needs {what} on it for this")]
    PermissionDenied { table: String, what: &'static str },
    #[error("{table} is tracked through its parent {parent}: untrack {parent} instead")]
    TrackedViaParent { table: String, parent: String },
    #[error("refusing to drop or truncate {0}: it holds audit history")]
    DropRefused(String),
    #[error("{table} was truncated at {at}, after the requested time, and TRUNCATE does not log the rows it removes")]
    TruncatedSince { table: String, at: String },
    #[error("relation \"{table}\" is not tracked by audit_ext")]
    NotTracked { table: String },
    #[error("audit.require_actor is on, but app.current_user is not set")]
    ActorRequired,
    #[error("{0}")]
    TooEarly(String),
    #[error("{0}")]
    UndoRefused(String),
    #[error("{0}")]
    UndoConflict(String),
    #[error("no audit rows for transaction {0}")]
    UndoNothing(i64),
    #[error("reads of {table} cannot be recorded: audit_ext is not in shared_preload_libraries")]
    ReadsNeedPreload { table: String },
    #[error("cannot record reads of {table}: audit.databases does not name this database, so no worker would write them")]
    ReadsNotServed { table: String },
    #[error("nothing to record for {table}: reads and writes are both false")]
    NothingToRecord { table: String },
    #[error("{0}: run ALTER EXTENSION audit_ext UPDATE first")]
    NeedsUpdate(&'static str),
    #[error("nothing is sealed yet: run audit.seal() first")]
    NothingSealed,
    #[error("audit.seal() gave up waiting for a transaction that holds unsealed audit ids (lock_timeout or statement_timeout)")]
    SealWaitTimedOut,
    #[error("invalid digest: {0}")]
    BadDigest(String),
    #[error("audit_ext is not installed in this database")]
    NotInstalled,
    #[error("{0}")]
    InvalidArgument(String),
    #[error(
        "the name \"{name}\" is not ASCII: in a {encoding} database audit_ext supports only ASCII \
         schema, table and column names"
    )]
    NonAsciiIdentifier { name: String, encoding: String },
    #[error("{0}")]
    BaselineRefused(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Spi(#[from] pgrx::spi::Error),
}

impl AuditError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            AuditError::NullArgument(_) => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            AuditError::UnknownColumn { .. } => ERRCODE_UNDEFINED_COLUMN,
            AuditError::ExcludedAndRedacted { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            AuditError::WrongObjectType { .. } => ERRCODE_WRONG_OBJECT_TYPE,
            AuditError::NotTrackable { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            AuditError::NotOwner { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            AuditError::PermissionDenied { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            AuditError::DropRefused(_) => ERRCODE_OBJECT_IN_USE,
            AuditError::TrackedViaParent { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            AuditError::TruncatedSince { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            AuditError::NotTracked { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            AuditError::ActorRequired => ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            AuditError::TooEarly(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            AuditError::UndoRefused(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            AuditError::UndoConflict(_) => ERRCODE_T_R_SERIALIZATION_FAILURE,
            AuditError::UndoNothing(_) => ERRCODE_NO_DATA_FOUND,
            AuditError::NotInstalled => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            AuditError::NothingSealed => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            AuditError::ReadsNeedPreload { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            AuditError::ReadsNotServed { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            AuditError::NothingToRecord { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            AuditError::NeedsUpdate(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            AuditError::SealWaitTimedOut => ERRCODE_LOCK_NOT_AVAILABLE,
            AuditError::BadDigest(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            AuditError::InvalidArgument(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            AuditError::NonAsciiIdentifier { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            AuditError::BaselineRefused(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            AuditError::Internal(_) | AuditError::Spi(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            AuditError::ActorRequired => Some(
                "SET LOCAL \"app.current_user\" = '...' (or set_config('app.current_user', ..., true)) before writing.",
            ),
            AuditError::UndoConflict(_) => Some("Pass force => true to undo anyway."),
            AuditError::DropRefused(_) => Some("A superuser can SET audit.allow_drop = on in this session first."),
            AuditError::SealWaitTimedOut => Some(
                "Nothing was sealed. Find the transaction in pg_locks (a lock on the audit_ext extension object) and end it, or raise lock_timeout.",
            ),
            AuditError::ReadsNeedPreload { .. } => Some(
                "Add audit_ext to shared_preload_libraries and restart the server: reads are seen by executor hooks, which only a preloaded library can install.",
            ),
            AuditError::ReadsNotServed { .. } => Some(
                "Add this database to audit.databases (or empty it to serve every database) and reload the configuration.",
            ),
            AuditError::NothingToRecord { .. } => Some("To stop recording the table, call audit.untrack()."),
            AuditError::NonAsciiIdentifier { .. } => Some(
                "Rename it to an ASCII name (its changes are still recorded meanwhile), or keep such tables in a UTF8 database.",
            ),
            _ => None,
        }
    }

    /// Raise as a PostgreSQL ERROR; never returns.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), "audit_ext");
        if let Some(h) = self.hint() {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

pub type Result<T> = std::result::Result<T, AuditError>;

/// Unwrap a result at the SQL boundary: errors become ereport(ERROR).
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}
