//! The extension's own objects (its pg_extension row, owner, audit.log and its
//! default partition, the id sequence, audit.tracked), looked up once per
//! backend. A relcache invalidation of any of them, which DROP EXTENSION and
//! CREATE EXTENSION send, drops the entry and bumps a generation number, which
//! caches of this incarnation's contents (the redaction key: crate::secret)
//! compare against.

use std::cell::Cell;

use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;

use crate::errors::{AuditError, Result};

/// The extension's objects, resolved by name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ExtState {
    /// The pg_extension row's oid: transactions holding audit ids lock it (chain::writers).
    pub ext: Oid,
    pub owner: Oid,
    pub log: Oid,
    /// audit.log_default, which writers lock before they route a row (log::sink).
    pub log_default: Oid,
    pub seq: Oid,
    /// audit.access_log and its default partition; InvalidOid before ALTER
    /// EXTENSION UPDATE makes them (0.1.0's tables have none).
    pub access_log: Oid,
    pub access_log_default: Oid,
    pub tracked: Oid,
    pub secret: Oid,
}

thread_local! {
    static EXT: Cell<Option<ExtState>> = const { Cell::new(None) };
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: Oid) {
    // Runs inside invalidation processing: only forget, never query.
    if let Some(e) = EXT.with(|e| e.get()) {
        if relid == pg_sys::InvalidOid
            || [
                e.log,
                e.log_default,
                e.seq,
                e.tracked,
                e.secret,
                e.access_log,
                e.access_log_default,
            ]
            .contains(&relid)
        {
            EXT.with(|e| e.set(None));
            GENERATION.with(|g| g.set(g.get() + 1));
        }
    }
}

fn ensure_registered() {
    if !REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: registers a static callback once per backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0))
        };
    }
}

/// Changes whenever the cached state is dropped: a value read from the
/// extension's tables under one generation may be stale under the next.
pub fn generation() -> u64 {
    GENERATION.with(|g| g.get())
}

/// The extension owner's oid (pg_extension is readable by everyone).
fn extension_owner() -> Result<Oid> {
    crate::query::one::<Oid>(
        "SELECT (SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'audit_ext')",
    )?
    .ok_or(AuditError::NotInstalled)
}

/// The extension's objects. Found by name without ACL checks, because the
/// caller need not have USAGE on schema audit.
pub fn ext_state() -> Result<ExtState> {
    ensure_registered();
    if let Some(e) = EXT.with(|e| e.get()) {
        return Ok(e);
    }
    let owner = extension_owner()?;
    // SAFETY: plain syscache lookups by name; missing_ok returns InvalidOid.
    let st = unsafe {
        let ns = pg_sys::get_namespace_oid(c"audit".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return Err(AuditError::NotInstalled);
        }
        let rel = |name: &std::ffi::CStr| pg_sys::get_relname_relid(name.as_ptr(), ns);
        ExtState {
            ext: pg_sys::get_extension_oid(c"audit_ext".as_ptr(), true),
            owner,
            log: rel(c"log"),
            log_default: rel(c"log_default"),
            seq: rel(c"log_id_seq"),
            tracked: rel(c"tracked"),
            secret: rel(c"secret"),
            access_log: rel(c"access_log"),
            access_log_default: rel(c"access_log_default"),
        }
    };
    if [st.ext, st.log, st.log_default, st.seq, st.tracked, st.secret].contains(&pg_sys::InvalidOid)
    {
        return Err(AuditError::NotInstalled);
    }
    EXT.with(|e| e.set(Some(st)));
    Ok(st)
}
