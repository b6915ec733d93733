//! Which relations' reads are recorded, per backend: a relation maps to the
//! read-tracked table it belongs to (itself, or the tracked ancestor of a
//! partition), or to nothing. A statement that touches no tracked table then
//! costs a hash lookup per relation. Entries are dropped by relcache
//! invalidation, which audit.track() and audit.untrack() send for the table and
//! its partitions, and all of them when a schema is renamed.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;

use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;

/// A read-tracked table, under the name its reads are recorded with.
pub struct Target {
    pub named: Oid,
    pub schema: CString,
    pub table: CString,
    /// audit.log or audit.access_log: recorded only with audit.access_log_self.
    pub is_log: bool,
}

thread_local! {
    static MAP: RefCell<HashMap<Oid, Option<Rc<Target>>>> = RefCell::new(HashMap::new());
    static FLUSH: Cell<bool> = const { Cell::new(false) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: Oid) {
    if relid == pg_sys::InvalidOid {
        FLUSH.with(|f| f.set(true));
        return;
    }
    MAP.with(|m| match m.try_borrow_mut() {
        Ok(mut m) => m.retain(|k, t| *k != relid && t.as_ref().is_none_or(|t| t.named != relid)),
        Err(_) => FLUSH.with(|f| f.set(true)),
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn namespace_callback(_arg: pg_sys::Datum, _id: i32, _hash: u32) {
    FLUSH.with(|f| f.set(true));
}

fn ensure_registered() {
    if !REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: static callbacks, registered once per backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0));
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
                Some(namespace_callback),
                pg_sys::Datum::from(0),
            );
        }
    }
}

/// The read-tracked table `relid` belongs to, if its reads are recorded now.
pub fn lookup(relid: Oid) -> Option<Rc<Target>> {
    // System catalogs are never tracked: no lookup at all for them.
    if u32::from(relid) < pg_sys::FirstNormalObjectId {
        return None;
    }
    ensure_registered();
    if FLUSH.with(|f| f.replace(false)) {
        MAP.with(|m| m.borrow_mut().clear());
    }
    let t = match MAP.with(|m| m.borrow().get(&relid).cloned()) {
        Some(t) => t,
        None => {
            let t = crate::quiet::hush(|| find_safely(relid)).map(Rc::new);
            MAP.with(|m| m.borrow_mut().insert(relid, t.clone()));
            t
        }
    };
    t.filter(|t| !t.is_log || crate::settings::ACCESS_LOG_SELF.get())
}

/// [`find`], in a subtransaction: a failure there (an extension half-way through
/// ALTER EXTENSION UPDATE, say) must never fail the statement that reads.
fn find_safely(relid: Oid) -> Option<Target> {
    match crate::subxact::run(|| find(relid), |_| true) {
        Ok(t) => t,
        Err(e) => {
            debug1!(
                "audit_ext: cannot tell whether relation {relid:?} is read-tracked: {}",
                e.message
            );
            None
        }
    }
}

/// Reads audit.tracked (as the extension owner) for `relid` and its ancestors.
fn find(relid: Oid) -> Option<Target> {
    let ext = crate::ext::ext_state().ok()?;
    // The caller need not have USAGE on schema audit.
    let _owner = crate::privilege::AsOwner::enter(ext.owner);
    if !crate::version::schema_is_current().unwrap_or(false) {
        return None; // 0.1.0's tables: no reads column, nothing is read-tracked
    }
    // Read-only SPI: a reading statement must not get an xid from us (nor fail on a standby).
    let named = crate::query::one_with_args::<Oid>(
        "SELECT (SELECT a.relid::pg_catalog.oid
                   FROM (SELECT $1::pg_catalog.regclass AS relid, 0::pg_catalog.int8 AS ord
                         UNION ALL
                         SELECT * FROM pg_catalog.pg_partition_ancestors($1) WITH ORDINALITY) AS a
                   LEFT JOIN audit.tracked t ON t.relid OPERATOR(pg_catalog.=) a.relid AND t.reads
                  WHERE t.relid IS NOT NULL
                     OR a.relid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('audit.log')
                     OR a.relid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('audit.access_log')
                  ORDER BY a.ord LIMIT 1)",
        &[relid.into()],
    )
    .ok()
    .flatten()?;
    // SAFETY: syscache lookups of a relation that exists (it is being read); NULL if
    // it vanished concurrently.
    let (schema, table) = unsafe {
        let s = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(named));
        let t = pg_sys::get_rel_name(named);
        if s.is_null() || t.is_null() {
            return None;
        }
        (CStr::from_ptr(s).to_owned(), CStr::from_ptr(t).to_owned())
    };
    // SAFETY: syscache lookups by name.
    let access_log = unsafe {
        let ns = pg_sys::get_namespace_oid(c"audit".as_ptr(), true);
        pg_sys::get_relname_relid(c"access_log".as_ptr(), ns)
    };
    Some(Target { named, schema, table, is_log: named == ext.log || named == access_log })
}
