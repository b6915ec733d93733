//! audit_ext: a tamper-evident, queryable, partitioned history of table changes.
//! Each concern lives in its own module; this file only wires them together.

use pgrx::prelude::*;

pub mod capture;
pub mod chain;
pub mod ddl;
pub mod errors;
pub mod partitions;
pub mod privilege;
pub mod query;
pub mod quote;
pub mod settings;
pub mod status;
pub mod subxact;
pub mod time_travel;
pub mod tracking;
pub mod version;
pub mod worker;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::init();
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
