//! `audit.version()` (new in 0.2.0): which audit_ext is installed in this
//! database, which library the server loaded, and whether the background worker
//! is there. Added by sql/audit_ext--0.1.0--0.2.0.sql on upgrade.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::json;

use crate::errors::{OrRaise, Result};

fn version_impl() -> Result<serde_json::Value> {
    // One catalog query, nothing from schema audit and no superuser-only
    // setting: any role granted EXECUTE may call it. Whether the library was
    // preloaded is known here, not from shared_preload_libraries (which only
    // superusers and pg_read_all_settings may read).
    let server = crate::query::one::<JsonB>(
        "SELECT pg_catalog.jsonb_build_object(
           'extension_version', (SELECT e.extversion FROM pg_catalog.pg_extension e WHERE e.extname = 'audit_ext'),
           'postgresql_version', pg_catalog.current_setting('server_version'),
           'postgresql_version_num', pg_catalog.current_setting('server_version_num')::int4,
           'launcher_running', EXISTS (SELECT FROM pg_catalog.pg_stat_activity a
                                        WHERE a.backend_type = 'audit_ext launcher'))",
    )?
    .map(|j| j.0)
    .unwrap_or_default();
    let mut v = json!({
        "library_version": env!("CARGO_PKG_VERSION"),
        "library_built_for": pg_sys::PG_MAJORVERSION_NUM,
        "background_worker": crate::access::preloaded(),
    });
    if let (Some(v), serde_json::Value::Object(server)) = (v.as_object_mut(), server) {
        v.extend(server);
    }
    Ok(v)
}

/// Whether this database's SQL objects are this library's. Between a package
/// upgrade and `ALTER EXTENSION audit_ext UPDATE`, the new library runs against
/// 0.1.0's tables: capture, seal and verify keep working as 0.1.0 did, and what
/// needs the new tables (retention records, the worker's candidate,
/// audit.status()) waits for the update.
pub fn schema_is_current() -> Result<bool> {
    // Two syscache lookups, not a query: the worker asks before every batch of reads.
    // SAFETY: syscache lookups by name; missing_ok returns InvalidOid.
    Ok(unsafe {
        let ns = pg_sys::get_namespace_oid(c"audit".as_ptr(), true);
        ns != pg_sys::InvalidOid
            && pg_sys::get_relname_relid(c"prune_parts".as_ptr(), ns) != pg_sys::InvalidOid
    })
}

/// `{extension_version, library_version, library_built_for, postgresql_version,
/// postgresql_version_num, background_worker, launcher_running}`.
/// `extension_version` is this database's (`ALTER EXTENSION audit_ext UPDATE`
/// changes it), `library_version` the loaded shared library's (the package's);
/// they differ between a package upgrade and the `ALTER EXTENSION`.
/// `background_worker` is whether audit_ext is in `shared_preload_libraries`.
#[pg_extern(stable, parallel_safe)]
fn version() -> JsonB {
    JsonB(version_impl().or_raise())
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn version_reports_both_versions() {
        let v = Spi::get_one::<pgrx::JsonB>("SELECT audit.version()").unwrap().unwrap().0;
        assert_eq!(v["library_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["extension_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["library_built_for"], pgrx::pg_sys::PG_MAJORVERSION_NUM);
        // The pg_test cluster preloads audit_ext (src/lib.rs).
        assert_eq!(v["background_worker"], true);
        assert!(
            v["postgresql_version_num"].as_i64().unwrap() / 10000
                == pgrx::pg_sys::PG_MAJORVERSION_NUM as i64
        );
    }
}
