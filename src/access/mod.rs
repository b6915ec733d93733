//! Access auditing: who read the read-tracked tables. Reading backends never
//! write: the hooks (hooks.rs) copy a fixed-size record (record.rs) into a
//! shared queue (queue.rs), and the background worker (drain.rs) inserts them
//! into audit.access_log, hashed into the same chain as audit.log. Every record
//! that cannot be queued is counted, and the count becomes a row of its own.

mod drain;
mod hooks;
mod queue;
mod record;
mod targets;

pub use drain::{discard, drain, BATCH};
pub use hooks::note_function_read;
pub use queue::{
    drainer_going_idle, drainer_gone, pending, set_launcher_latch, waiting_databases,
    waiting_databases_before_sleep,
};

use std::cell::Cell;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::settings::{self, Overflow};
use record::{Kind, Record};

static mut PRELOADED: bool = false;
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Whether the hooks are installed: audit_ext is in shared_preload_libraries.
pub fn preloaded() -> bool {
    // SAFETY: written once by _PG_init of a preloaded library, before any query.
    unsafe { PRELOADED }
}

/// From _PG_init when the library is preloaded: the queue's shared memory and the hooks.
pub fn init() {
    // SAFETY: _PG_init in the postmaster (preload): hook chaining, once.
    unsafe {
        PRELOADED = true;
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
        // Records carry the statement's query id.
        pg_sys::EnableQueryId();
    }
    hooks::install();
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: chains to the previous hook, as every shmem_request_hook must.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
    }
    queue::request(settings::ACCESS_QUEUE_SIZE.get() as usize);
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: chains to the previous hook, as every shmem_startup_hook must.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
    }
    queue::attach(settings::ACCESS_QUEUE_SIZE.get() as usize);
}

/// Records this backend could not queue, not yet reported.
#[derive(Clone, Copy, Default)]
struct Lost {
    count: i64,
    first: i64,
    last: i64,
}

thread_local! {
    static LOST: Cell<Lost> = const { Cell::new(Lost { count: 0, first: 0, last: 0 }) };
    static EXIT_HOOKED: Cell<bool> = const { Cell::new(false) };
}

/// A backend that leaves with losses not yet reported reports them on its way out.
#[pg_guard]
unsafe extern "C-unwind" fn report_losses_at_exit(_code: i32, _arg: pg_sys::Datum) {
    report_losses();
}

/// How long `block` waits between tries for a free slot.
const BLOCK_POLL_US: std::ffi::c_long = 1_000;

/// Queues a record under `audit.access_overflow`. `may_raise`: the policy
/// `error` may fail the statement (not while a transaction aborts).
fn enqueue(rec: &Record, may_raise: bool) {
    // SAFETY: a plain read of shared recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        // A standby cannot insert, and its worker does not run: one log line instead.
        log_line(rec);
        return;
    }
    if !settings::serves_this_database() {
        // No worker will write this database's records: queued, they would only fill
        // the queue every database shares. Counted instead, and said by a LOST row
        // once the worker serves the database again.
        note_loss(rec.h.accessed_at);
        warn_not_served();
        return;
    }
    report_losses();
    if try_push(rec) {
        return;
    }
    let policy = settings::access_overflow();
    if policy == Overflow::Block {
        let mut waited_us: std::ffi::c_long = 0;
        let limit_us = std::ffi::c_long::from(settings::ACCESS_BLOCK_TIMEOUT.get()) * 1000;
        while waited_us < limit_us {
            // SAFETY: a plain sleep.
            unsafe { pg_sys::pg_usleep(BLOCK_POLL_US) };
            waited_us += BLOCK_POLL_US;
            if try_push(rec) {
                return;
            }
        }
    }
    note_loss(rec.h.accessed_at);
    if policy == Overflow::Error && may_raise {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
            "audit_ext: the access-audit queue is full; the read was not recorded",
            "audit.access_overflow = error refuses reads that cannot be recorded. Raise audit.access_queue_size, or check that the background worker runs."
        );
    }
}

/// One structured server-log line for a read that cannot be stored (on a standby).
fn log_line(rec: &Record) {
    use record::Text;
    let t = |f: Text| String::from_utf8_lossy(rec.text(f)).into_owned();
    let line = serde_json::json!({
        "schema_name": t(Text::Schema),
        "table_name": t(Text::Table),
        "command": t(Text::Command),
        "columns": rec.column_numbers().collect::<Vec<_>>(),
        "rows": rec.h.rows,
        "outcome": rec.h.outcome.as_str(),
        "sqlstate": rec.h.sqlstate,
        "accessed_by": t(Text::AccessedBy),
        "db_user": t(Text::DbUser),
        "role": t(Text::Role),
        "backend_pid": rec.h.pid,
        "statement": t(Text::Statement),
    });
    log!("audit_ext read on a standby: {line}");
}

fn try_push(rec: &Record) -> bool {
    queue::push(rec)
}

fn note_loss(at: i64) {
    if !EXIT_HOOKED.with(|h| h.replace(true)) {
        // SAFETY: registers a static callback once per backend.
        unsafe { pg_sys::before_shmem_exit(Some(report_losses_at_exit), pg_sys::Datum::from(0)) };
    }
    LOST.with(|l| {
        let mut v = l.get();
        if v.count == 0 {
            v.first = at;
        }
        v.count += 1;
        v.last = at;
        l.set(v);
    });
}

/// Once per backend: why its reads are not recorded.
fn warn_not_served() {
    thread_local! {
        static WARNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !WARNED.with(|w| w.replace(true)) {
        pgrx::warning!(
            "audit_ext: reads of read-tracked tables in this database are not recorded: audit.databases does not name it, so no worker writes them (they are counted, and a LOST row says how many once it does)"
        );
    }
}

/// Queues a record saying how many of this backend's records were dropped, if any.
fn report_losses() {
    let lost = LOST.with(|l| l.get());
    if lost.count == 0 || !settings::serves_this_database() {
        return;
    }
    let mut r = Record::new(Kind::Lost);
    // SAFETY: plain reads of this backend's identity.
    unsafe {
        r.h.db = pg_sys::MyDatabaseId;
        r.h.pid = pg_sys::MyProcPid;
    }
    r.h.accessed_at = lost.first;
    r.h.until = lost.last;
    r.h.rows = lost.count;
    r.set_texts([b"", b"", b"LOST", b"", b"", b"", b"", b"", b""], |_, n| n);
    if queue::push(&r) {
        LOST.with(|l| l.set(Lost::default()));
    }
}
