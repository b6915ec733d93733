//! Smoke test: the extension installs and reports the crate's version.
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use common::{Cluster, ClusterOpts};

#[test]
fn create_extension_reports_crate_version() {
    let cluster = Cluster::start(ClusterOpts::new().preload(true));
    let mut first = cluster.connect("postgres");
    let mut second = cluster.connect("postgres");

    first.batch_execute("CREATE EXTENSION audit_ext").expect("CREATE EXTENSION audit_ext");

    let row = second
        .query_one("SELECT extversion FROM pg_extension WHERE extname = 'audit_ext'", &[])
        .expect("audit_ext is in pg_extension");
    let version: String = row.get(0);
    assert_eq!(version, env!("CARGO_PKG_VERSION"));

    drop(first);
    drop(second);
    cluster.assert_no_crash();
}
