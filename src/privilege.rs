//! Who runs what. PUBLIC has no privilege in `audit`, so the extension switches
//! to its owner to read or write its own objects, and only for that: anything
//! that can run user code (casts, output functions, reads of user tables) runs
//! as the caller, so a table owner cannot borrow the extension owner's rights.

use pgrx::pg_sys::{self, Oid};

use crate::errors::{AuditError, Result};

/// While alive, the current user is the extension owner. Restored on drop; on
/// ERROR, transaction abort restores it as it does for SECURITY DEFINER.
pub struct AsOwner {
    uid: Oid,
    ctx: i32,
}

impl AsOwner {
    /// Also marks a security-restricted operation, as the trigger path wants.
    pub fn enter(owner: Oid) -> Self {
        Self::switch(owner, (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32)
    }

    fn switch(owner: Oid, flags: i32) -> Self {
        let (mut uid, mut ctx) = (pg_sys::InvalidOid, 0);
        // SAFETY: a plain save and set of the backend's user id, as fmgr_security_definer does.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut uid, &mut ctx);
            pg_sys::SetUserIdAndSecContext(owner, ctx | flags);
        }
        AsOwner { uid, ctx }
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // SAFETY: restores exactly what enter() saved.
        unsafe { pg_sys::SetUserIdAndSecContext(self.uid, self.ctx) };
    }
}

/// The extension owner's oid (pg_extension is readable by everyone).
pub fn extension_owner() -> Result<Oid> {
    crate::query::one::<Oid>(
        "SELECT (SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'audit_ext')",
    )?
    .ok_or(AuditError::NotInstalled)
}

/// Runs `f` as the extension owner. `f` must only touch audit_ext's own objects.
pub fn as_extension_owner<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    // Not security-restricted: maintenance creates and detaches partitions.
    let owner = crate::capture::cache::ext_state()?.owner;
    let _owner = AsOwner::switch(owner, pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    f()
}

/// Reading a table's history is reading the table: require SELECT on it.
pub fn require_select(relid: Oid, table: &str) -> Result<()> {
    // SAFETY: an ACL check of the current user against the syscache.
    let ok = unsafe { pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as pg_sys::AclMode) }
        == pg_sys::AclResult::ACLCHECK_OK;
    if ok {
        Ok(())
    } else {
        Err(AuditError::PermissionDenied { table: table.to_string(), what: "SELECT" })
    }
}
