//! While audit_ext's own code runs SQL, its reads are not the user's: access
//! auditing (crate::access) records nothing while a [`Quiet`] is held. Every
//! switch to the extension owner holds one (crate::privilege), and so do the
//! reading functions while they read a table for the caller.

use std::cell::Cell;

use pgrx::pg_sys;
use pgrx::prelude::*;

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// A transaction that ends ends every Quiet in it, even one whose Drop an ERROR skipped.
#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT) {
        DEPTH.with(|d| d.set(0));
    }
}

pub fn active() -> bool {
    DEPTH.with(|d| d.get() > 0)
}

/// Held while alive; an ERROR unwinds through Drop too (pgrx turns it into a panic).
pub struct Quiet(());

impl Quiet {
    pub fn enter() -> Quiet {
        if !REGISTERED.with(|r| r.replace(true)) {
            // SAFETY: a static callback, registered once per backend.
            unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
        }
        DEPTH.with(|d| d.set(d.get() + 1));
        Quiet(())
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

pub fn hush<R>(f: impl FnOnce() -> R) -> R {
    let _q = Quiet::enter();
    f()
}
