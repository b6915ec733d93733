//! Who runs what. PUBLIC has no privilege in `audit`, so the extension switches
//! to its owner to read or write its own objects, and only for that: anything
//! that can run user code (casts, output functions, reads of user tables) runs
//! as the caller, so a table owner cannot borrow the extension owner's rights.

use pgrx::pg_sys::{self, Oid};

use crate::errors::{AuditError, Result};

/// The only search_path under which SQL runs as the extension owner (or in the
/// worker): pg_catalog first, pg_temp last, so that no schema a user can create
/// objects in can shadow an operator, function, type or table our SQL names.
pub const FIXED_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// While alive, the current user is the extension owner. Restored on drop; on
/// ERROR, transaction abort restores it as it does for SECURITY DEFINER.
///
/// Every switch that may run SQL also pins `search_path` to
/// [`FIXED_SEARCH_PATH`] for its lifetime, exactly as a function's
/// `SET search_path` clause does (a GUC nest level, closed on drop and by abort),
/// so no code path can forget to.
pub struct AsOwner {
    /// What the extension reads as its owner is not a read to audit.
    _quiet: crate::quiet::Quiet,
    uid: Oid,
    ctx: i32,
    /// The GUC nest level opened for the fixed search_path; 0 when none was.
    guc_level: i32,
}

impl AsOwner {
    /// Also marks a security-restricted operation, as the trigger path wants.
    pub fn enter(owner: Oid) -> Self {
        Self::switch(
            owner,
            (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32,
            true,
        )
    }

    /// The trigger's per-row switch, which runs no SQL that is parsed or planned
    /// under it: a direct call of nextval and a heap insert, or (with row-level
    /// security on audit.log) a kept plan of an INSERT with qualified names and no
    /// operators. Pinning search_path per row would cost a GUC save and restore
    /// (on PostgreSQL 15 a walk over every GUC) for nothing, so this one does not.
    pub fn enter_for_row_write(owner: Oid) -> Self {
        Self::switch(
            owner,
            (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32,
            false,
        )
    }

    fn switch(owner: Oid, flags: i32, pin_search_path: bool) -> Self {
        let (mut uid, mut ctx) = (pg_sys::InvalidOid, 0);
        // SAFETY: a plain save and set of the backend's user id, as fmgr_security_definer does.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut uid, &mut ctx);
            pg_sys::SetUserIdAndSecContext(owner, ctx | flags);
        }
        let guc_level = if pin_search_path { pin_fixed_search_path() } else { 0 };
        AsOwner { _quiet: crate::quiet::Quiet::enter(), uid, ctx, guc_level }
    }
}

/// Opens a GUC nest level and sets search_path in it, as fmgr does for a
/// function's SET clause. Returns the level, for AtEOXact_GUC to close.
pub fn pin_fixed_search_path() -> i32 {
    // SAFETY: NewGUCNestLevel has no preconditions.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    // search_path is a USERSET setting: PGC_USERSET is always allowed to set it.
    set_setting(
        c"search_path",
        FIXED_SEARCH_PATH,
        pg_sys::GucContext::PGC_USERSET,
        pg_sys::GucAction::GUC_ACTION_SAVE,
        true,
    );
    level
}

/// Sets a setting at session level (GUC_ACTION_SAVE: inside the current nest
/// level). A refused value raises an ERROR when `must`, else a WARNING.
pub fn set_setting(
    name: &std::ffi::CStr,
    value: &std::ffi::CStr,
    context: pg_sys::GucContext::Type,
    action: pg_sys::GucAction::Type,
    must: bool,
) {
    let elevel = if must { pgrx::PgLogLevel::ERROR } else { pgrx::PgLogLevel::WARNING };
    // SAFETY: both strings are NUL-terminated and outlive the call, which copies them.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            context,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            elevel as i32,
            false,
        );
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // While an ERROR unwinds, transaction (or subtransaction) abort closes the
        // level; closing it here too would run GUC code on a failing transaction.
        if self.guc_level > 0 && !std::thread::panicking() {
            // SAFETY: closes the level switch() opened, restoring the caller's search_path.
            unsafe { pg_sys::AtEOXact_GUC(true, self.guc_level) };
        }
        // SAFETY: restores exactly what switch() saved.
        unsafe { pg_sys::SetUserIdAndSecContext(self.uid, self.ctx) };
    }
}

/// Runs `f` as the extension owner. `f` must only touch audit_ext's own objects.
pub fn as_extension_owner<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    // Not security-restricted: maintenance creates and detaches partitions.
    let owner = crate::ext::ext_state()?.owner;
    let _owner = AsOwner::switch(owner, pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32, true);
    f()
}

/// Reading a table's history is reading the table: require SELECT on it.
pub fn require_select(relid: Oid, table: &str) -> Result<()> {
    // SAFETY: an ACL check of the current user against the syscache.
    let ok = unsafe {
        pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as pg_sys::AclMode)
    } == pg_sys::AclResult::ACLCHECK_OK;
    if ok {
        Ok(())
    } else {
        Err(AuditError::PermissionDenied { table: table.to_string(), what: "SELECT" })
    }
}
