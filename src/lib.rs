//! audit_ext: a tamper-evident, queryable, partitioned history of table changes.
//! Each concern lives in its own module; this file only wires them together.
//! CONTRIBUTING.md has the module map.
#![deny(unsafe_op_in_unsafe_fn)]

use pgrx::prelude::*;

mod access;
mod baseline;
mod capture;
mod chain;
mod datum;
mod db_text;
mod ddl;
mod errors;
mod ext;
mod image;
mod live_rows;
mod log;
mod partitions;
mod privilege;
mod query;
mod quiet;
mod quote;
mod raw_hooks;
mod row_key;
mod secret;
mod settings;
mod status;
mod subxact;
mod time_travel;
mod tracking;
mod undo;
mod verify_table;
mod version;
mod worker;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::init();
    // SAFETY: a plain read of whether this is the preload pass.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        access::init();
    }
    // After access auditing's hooks, so that ours run first (log::batch says why).
    // Also when not preloaded: the library is loaded at its first use, and every
    // statement after that can have its audit rows batched.
    log::batch::install();
    worker::register();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // The worker is paused: it would race the tests' own seal() calls.
        vec!["shared_preload_libraries = 'audit_ext'", "audit.naptime = 0"]
    }
}
