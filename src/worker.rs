//! The background worker, registered only when audit_ext is in
//! `shared_preload_libraries`. A launcher, connected to no database, lists the
//! databases every `audit.naptime` and starts one short-lived worker per
//! database, one at a time. That worker runs `audit.maintain()` and
//! `audit.seal()` if the extension is installed there, then exits, so it never
//! holds a database open (DROP DATABASE and CREATE DATABASE are not blocked).
//! The launcher starts only once recovery has finished, so a standby runs
//! nothing.

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

/// How soon the postmaster restarts a worker that exited with an error.
const RESTART_AFTER: Duration = Duration::from_secs(5);
/// With audit.naptime = 0 (paused) the launcher only waits for a reload or a
/// shutdown; its latch wakes it for those, so this timeout is only a backstop.
const PAUSED_WAKEUP: Duration = Duration::from_secs(3600);

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn audit_ext_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    log!("audit_ext launcher started");
    loop {
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
        for db in database_list() {
            if BackgroundWorker::sigterm_received() {
                break;
            }
            if wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == &db)) {
                run_in(&db);
            }
        }
        if !BackgroundWorker::wait_latch(Some(naptime)) {
            break;
        }
    }
    // Exit code 1 makes the postmaster start the launcher again after a
    // pg_terminate_backend; at shutdown it starts nothing.
    // SAFETY: ends the process the normal way, running on_proc_exit callbacks.
    unsafe { pg_sys::proc_exit(1) };
}

/// Every database that accepts connections, read from the shared catalog pg_database.
fn database_list() -> Vec<String> {
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
                    names.push(name.to_string_lossy().into_owned());
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

/// Runs one database's worker and waits for it to finish.
fn run_in(db: &str) {
    let started = BackgroundWorkerBuilder::new(&format!("audit_ext worker {db}"))
        .set_type("audit_ext worker")
        .set_library(LIBRARY)
        .set_function("audit_ext_db_main")
        .enable_spi_access()
        .set_extra(db)
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
    let db = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    BackgroundWorker::transaction(ignore_database_and_role_settings);
    let installed = BackgroundWorker::transaction(|| {
        crate::query::one::<bool>("SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'audit_ext')")
            .ok()
            .flatten()
            .unwrap_or(false)
    });
    if !installed {
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
