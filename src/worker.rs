//! The background worker, registered only when audit_ext is in
//! `shared_preload_libraries`. A launcher, connected to no database, lists the
//! databases every `audit.naptime` and starts one short-lived worker per
//! database, one at a time. That worker runs `audit.maintain()` and
//! `audit.seal()` if the extension is installed there, then exits, so it never
//! holds a database open (DROP DATABASE and CREATE DATABASE are not blocked).
//! The launcher starts only once recovery has finished, so a standby runs
//! nothing.
//!
//! Between those rounds, a backend that queues a read record (crate::access)
//! sets the launcher's latch, and the launcher starts a worker that only writes
//! the queued records of that database into audit.access_log.

use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::settings;

const LIBRARY: &str = "audit_ext";

/// Called from `_PG_init`.
pub fn register() {
    // SAFETY: a plain read of a backend global set by the postmaster.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    BackgroundWorkerBuilder::new("audit_ext launcher")
        .set_type("audit_ext launcher")
        .set_library(LIBRARY)
        .set_function("audit_ext_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

/// The worker's bgw_extra: what it does, then the database's name.
const ROUND_PREFIX: &str = "round:";
const READS_PREFIX: &str = "reads:";
/// Batches of read records a round's worker writes before it goes on with its round.
const MAX_READ_BATCHES: usize = 1_000;
/// After starting read workers, the launcher waits at least this long before it
/// looks again: records that arrive meanwhile are written together.
const READS_LINGER: Duration = Duration::from_millis(100);
/// How long a reads worker waits for more records before it exits. Short, so
/// that DROP DATABASE or CREATE DATABASE … TEMPLATE (which wait up to 5 s for
/// other sessions to leave) never fail because of it.
const READS_IDLE_EXIT: Duration = Duration::from_millis(500);
/// How long a reads worker waits after a small batch, for the next to be larger.
const READS_GATHER: Duration = Duration::from_millis(5);
/// How long a reads worker writes its database's records before it makes way
/// for another database's.
const READS_FAIR_SHARE: Duration = Duration::from_millis(200);
/// The longest a reads worker stays, so that the launcher's next round is not held up.
const READS_MAX_STAY: Duration = Duration::from_secs(10);

/// How soon the postmaster restarts a worker that exited with an error.
const RESTART_AFTER: Duration = Duration::from_secs(5);
/// With audit.naptime = 0 (paused) the launcher only waits for a reload or a
/// shutdown; its latch wakes it for those, so this timeout is only a backstop.
const PAUSED_WAKEUP: Duration = Duration::from_secs(3600);

/// Whether a SIGTERM came. pgrx's flag is cleared by reading it, so a look that
/// only leaves an inner loop would make every later look say no (a fast shutdown
/// then hung, the launcher napping on); the flag PostgreSQL's handler sets beside
/// it stays set.
fn shutdown_requested() -> bool {
    let _ = BackgroundWorker::sigterm_received();
    // SAFETY: a plain read of a sig_atomic_t that the SIGTERM handler sets.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn audit_ext_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    log!("audit_ext launcher started");
    // SAFETY: this process's own latch, in its PGPROC, valid for its life.
    crate::access::set_launcher_latch(unsafe { pg_sys::MyLatch });
    let mut last_round: Option<std::time::Instant> = None;
    loop {
        // Waiting for a worker to finish resets this process's latch, the SIGTERM's
        // wake-up included: without this look at the flag, a shutdown that came then
        // would wait for the next sleep to end (up to audit.naptime, or an hour paused).
        if shutdown_requested() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the standard reload in a background worker's main loop.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let Some(naptime) = settings::naptime() else {
            // Paused: wake up for a reload or shutdown only.
            if !BackgroundWorker::wait_latch(Some(PAUSED_WAKEUP)) {
                break;
            }
            continue;
        };
        let wanted = Some(settings::databases()).filter(|w| !w.is_empty());
        let served = |db: &str| wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == db));
        let due = last_round.is_none_or(|t| t.elapsed() >= naptime);
        let dbs = database_list();
        if due {
            last_round = Some(std::time::Instant::now());
            for (_, db) in dbs.iter().filter(|(_, db)| served(db)) {
                if shutdown_requested() {
                    break;
                }
                run_in(db, Mode::Round);
            }
        } else {
            let waiting = crate::access::waiting_databases();
            for (_, db) in dbs.iter().filter(|(oid, db)| waiting.contains(oid) && served(db)) {
                if shutdown_requested() {
                    break;
                }
                run_in(db, Mode::Reads);
            }
        }
        // Waiting for a worker to finish resets this process's latch, so the wake-ups
        // of records queued meanwhile are gone: look before sleeping. Only at records
        // a worker can write: a database the launcher does not serve keeps its own.
        let waiting = crate::access::waiting_databases_before_sleep();
        if shutdown_requested() {
            break;
        }
        if dbs.iter().any(|(oid, db)| waiting.contains(oid) && served(db)) {
            if !BackgroundWorker::wait_latch(Some(READS_LINGER)) {
                break;
            }
            continue;
        }
        let left = last_round.map(|t| naptime.saturating_sub(t.elapsed())).unwrap_or(naptime);
        if !BackgroundWorker::wait_latch(Some(left.max(READS_LINGER))) {
            break;
        }
    }
    // Exit code 1 makes the postmaster start the launcher again after a
    // pg_terminate_backend; at shutdown it starts nothing.
    // SAFETY: ends the process the normal way, running on_proc_exit callbacks.
    unsafe { pg_sys::proc_exit(1) };
}

/// Every database that accepts connections (oid, name), read from the shared catalog pg_database.
fn database_list() -> Vec<(pg_sys::Oid, String)> {
    BackgroundWorker::transaction(|| {
        let mut names = Vec::new();
        // SAFETY: a catalog heap scan inside a transaction, as autovacuum's get_database_list does.
        unsafe {
            let rel = pg_sys::table_open(
                pg_sys::DatabaseRelationId,
                pg_sys::AccessShareLock as pg_sys::LOCKMODE,
            );
            let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
            loop {
                let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tup.is_null() {
                    break;
                }
                let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tup);
                if (*form).datallowconn && !(*form).datistemplate {
                    let name = std::ffi::CStr::from_ptr((*form).datname.data.as_ptr());
                    names.push(((*form).oid, name.to_string_lossy().into_owned()));
                }
            }
            pg_sys::table_endscan(scan);
            pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        }
        names
    })
}

/// The transaction's start time, as `now()` would give it.
fn now() -> pgrx::datum::TimestampWithTimeZone {
    // SAFETY: a plain read of transaction state inside a transaction.
    let t = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    pgrx::datum::TimestampWithTimeZone::try_from(t)
        .unwrap_or_else(|_| pgrx::datum::TimestampWithTimeZone::positive_infinity())
}

/// What a database's worker does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The round every audit.naptime: read records, maintenance, sealing.
    Round,
    /// Only the read records queued for this database.
    Reads,
}

/// Runs one database's worker and waits for it to finish.
fn run_in(db: &str, mode: Mode) {
    let extra = format!("{}{db}", if mode == Mode::Round { ROUND_PREFIX } else { READS_PREFIX });
    let started = BackgroundWorkerBuilder::new(&format!("audit_ext worker {db}"))
        .set_type("audit_ext worker")
        .set_library(LIBRARY)
        .set_function("audit_ext_db_main")
        .enable_spi_access()
        .set_extra(&extra)
        // SAFETY: a plain read of this process's pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic();
    match started {
        Ok(handle) => {
            let _ = handle.wait_for_shutdown();
        }
        Err(_) => warning!(
            "audit_ext: could not start a worker for database \"{db}\": raise max_worker_processes"
        ),
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn audit_ext_db_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let extra = BackgroundWorker::get_extra().to_string();
    let (mode, db) = match extra.strip_prefix(READS_PREFIX) {
        Some(db) => (Mode::Reads, db.to_string()),
        None => (Mode::Round, extra.strip_prefix(ROUND_PREFIX).unwrap_or(&extra).to_string()),
    };
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    BackgroundWorker::transaction(ignore_database_and_role_settings);
    let installed = BackgroundWorker::transaction(|| {
        crate::query::one::<bool>("SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'audit_ext')")
            .ok()
            .flatten()
            .unwrap_or(false)
    });
    if !installed {
        // Reads queued before the extension was dropped have no log to go to.
        crate::access::discard();
        return;
    }
    write_reads(&db, mode == Mode::Reads);
    if mode == Mode::Reads {
        return;
    }
    // Two transactions: partitions made by maintain are committed even if sealing fails.
    // The library's own functions, called directly: the worker seals without waiting
    // (audit.seal() waits for writers; the worker must never hold anyone up).
    // Each in a subtransaction: a failed maintenance is rolled back, recorded for
    // audit.status() and logged, and sealing goes on regardless.
    use crate::errors::OrRaise;
    use crate::status::{record, Run};
    let report = BackgroundWorker::transaction(|| {
        match crate::subxact::run(
            || crate::partitions::maintain_impl(Some(now())).or_raise(),
            |_| true,
        ) {
            Ok(r) => Some(r),
            Err(e) => {
                warning!(
                    "audit_ext worker in database \"{db}\": maintenance failed: {}",
                    e.message
                );
                let _ =
                    record(Run::Maintain, Err(format!("{} (SQLSTATE {:?})", e.message, e.code)));
                None
            }
        }
    });
    let sealed = BackgroundWorker::transaction(|| {
        match crate::subxact::run(
            || crate::chain::seal::seal_impl(crate::chain::seal::Wait::No).or_raise(),
            |_| true,
        ) {
            Ok(n) => n,
            Err(e) => {
                warning!("audit_ext worker in database \"{db}\": sealing failed: {}", e.message);
                let _ = record(Run::Seal, Err(format!("{} (SQLSTATE {:?})", e.message, e.code)));
                0
            }
        }
    });
    let busy = |k: &str| {
        report
            .as_ref()
            .and_then(|r| r.get(k))
            .and_then(|v| v.as_array())
            .is_some_and(|a| !a.is_empty())
    };
    let moved = report
        .as_ref()
        .and_then(|r| r.get("moved_from_default"))
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    let did = sealed > 0 || moved > 0 || busy("created") || busy("retention");
    let summary = format!(
        "audit_ext worker in database \"{db}\": sealed {sealed} rows; maintain: {}",
        report.map(|r| r.to_string()).unwrap_or_default()
    );
    if did {
        log!("{summary}");
    } else {
        debug1!("{summary}");
    }
}

/// Writes this database's queued read records, a batch per transaction, until
/// none are left (or a batch fails: it is logged, and its records are lost).
/// Writes this database's queued read records. A round's worker writes what is
/// queued (at most MAX_READ_BATCHES batches) and goes on with its round. A reads
/// worker (`linger`) stays while more keep coming: after a small batch it waits
/// READS_GATHER for more, so that each transaction writes many records (a
/// commit per record cost more than the record); with none queued it sleeps on
/// its latch, which the next queued record sets, and leaves after
/// READS_IDLE_EXIT without one, or once it has had READS_FAIR_SHARE while
/// another database's records wait for their worker, or READS_MAX_STAY in all.
fn write_reads(db: &str, linger: bool) {
    use crate::errors::OrRaise;
    // SAFETY: plain reads of this process's database and latch.
    let (oid, latch) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyLatch) };
    let started = std::time::Instant::now();
    let mut batches = 0;
    loop {
        let n = BackgroundWorker::transaction(|| {
            match crate::subxact::run(|| crate::access::drain().or_raise(), |_| true) {
                Ok(n) => Some(n),
                Err(e) => {
                    warning!(
                        "audit_ext worker in database \"{db}\": writing read records failed: {}",
                        e.message
                    );
                    None
                }
            }
        });
        batches += 1;
        // A failure ends this worker: the next one starts afresh (and finds out,
        // say, that the extension was dropped).
        let Some(n) = n else { break };
        if shutdown_requested() {
            break;
        }
        if !linger {
            if n == 0 || batches >= MAX_READ_BATCHES {
                break;
            }
            continue;
        }
        let (_, others) = crate::access::pending(oid);
        let stayed = started.elapsed();
        // The launcher's rounds (maintenance, sealing) and other databases' reads
        // wait while this worker runs.
        if stayed >= READS_MAX_STAY || (others && stayed >= READS_FAIR_SHARE) {
            break;
        }
        if n >= crate::access::BATCH / 2 {
            continue;
        }
        if n > 0 {
            // Readers do not set the latch while it is not idle: this is a plain pause.
            if !BackgroundWorker::wait_latch(Some(READS_GATHER)) {
                break;
            }
            continue;
        }
        match crate::access::drainer_going_idle(oid, latch) {
            (true, _) => continue,
            (false, true) => break,
            (false, false) => {}
        }
        if !BackgroundWorker::wait_latch(Some(READS_IDLE_EXIT)) {
            break;
        }
        if !crate::access::pending(oid).0 {
            break; // none came (or another database's did): make way
        }
    }
    crate::access::drainer_gone();
}

/// The worker connects as a superuser, and the connection applies the settings
/// of `ALTER DATABASE … SET` and `ALTER ROLE … SET`, which a database owner
/// controls: a `search_path` naming a schema of theirs would make our SQL call
/// their operators as a superuser. So every such setting goes back to its
/// built-in value, except audit_ext's own (`audit.*`, which is how retention is
/// set per database), and search_path is pinned for the worker's life.
fn ignore_database_and_role_settings() {
    use crate::privilege::{set_setting, FIXED_SEARCH_PATH};
    use pg_sys::{GucAction::GUC_ACTION_SET, GucContext::PGC_SUSET};
    set_setting(c"search_path", FIXED_SEARCH_PATH, PGC_SUSET, GUC_ACTION_SET, true);
    let overridden: Vec<(String, Option<String>)> = Spi::connect(|c| {
        let mut v = Vec::new();
        if let Ok(rows) = c.select(
            "SELECT name::pg_catalog.text, boot_val FROM pg_catalog.pg_settings
              WHERE source OPERATOR(pg_catalog.=) ANY (ARRAY['database', 'user', 'database user'])
                AND name OPERATOR(pg_catalog.!~~) 'audit.%'
                AND name OPERATOR(pg_catalog.<>) 'search_path'",
            None,
            &[],
        ) {
            for r in rows {
                if let Ok(Some(name)) = r.get::<String>(1) {
                    v.push((name, r.get::<String>(2).ok().flatten()));
                }
            }
        }
        v
    });
    for (name, boot) in overridden {
        if let (Ok(name), Ok(boot)) =
            (std::ffi::CString::new(name), std::ffi::CString::new(boot.unwrap_or_default()))
        {
            // A setting that refuses its built-in value is a log line, not an exit.
            set_setting(&name, &boot, PGC_SUSET, GUC_ACTION_SET, false);
        }
    }
}
