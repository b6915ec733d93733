//! Which running transactions hold audit ids.
//!
//! A transaction takes a lock on the extension's own catalog object (mode
//! AccessShareLock) before it draws its first id from `audit.log_id_seq`, and
//! holds it until it ends. So once the sealer has read the sequence's last
//! value S, every id <= S that is not final yet belongs to a transaction that
//! holds this lock now, and `holders()` lists exactly those (and perhaps some
//! that drew ids above S). Transactions that never wrote an audit row do not
//! hold it, so a long report or a write to an untracked table never holds
//! sealing back.
//!
//! Why this lock: AccessShareLock on the extension conflicts only with
//! AccessExclusiveLock, which only DROP EXTENSION takes, and nobody without the
//! extension owner's rights can take any lock on that object. An advisory lock
//! would let any role stall every audited write by holding it exclusively.
//! The lock is taken under the top transaction's resource owner, so that a
//! subtransaction that rolls back does not release it.

use std::cell::Cell;

use pgrx::pg_sys::{self, Oid};

thread_local! {
    /// The local transaction id for which this backend already holds the lock.
    static MARKED: Cell<Option<u32>> = const { Cell::new(None) };
}

/// A running transaction, as (process slot, local transaction id) packed in
/// an i64 so it can be kept in `audit.seal_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writer(pub i64);

fn tag(ext: Oid) -> pg_sys::LOCKTAG {
    // SAFETY: a plain read of the backend's database oid.
    let db = unsafe { pg_sys::MyDatabaseId };
    // SET_LOCKTAG_OBJECT(tag, db, ExtensionRelationId, ext, 0)
    pg_sys::LOCKTAG {
        locktag_field1: db.to_u32(),
        locktag_field2: pg_sys::ExtensionRelationId.to_u32(),
        locktag_field3: ext.to_u32(),
        locktag_field4: 0,
        locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    }
}

fn current_lxid() -> u32 {
    // SAFETY: MyProc is this backend's own PGPROC, valid in any transaction.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        let lxid = (*pg_sys::MyProc).lxid;
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        let lxid = (*pg_sys::MyProc).vxid.lxid;
        lxid
    }
}

/// Marks the current transaction as one holding audit ids. Call before every
/// draw from the sequence; after the first in a transaction it costs a compare.
pub fn mark_current_transaction(ext: Oid) {
    let lxid = current_lxid();
    if MARKED.with(|m| m.get()) == Some(lxid) {
        return;
    }
    let t = tag(ext);
    // SAFETY: a regular lock acquisition (it may wait only behind DROP EXTENSION),
    // owned by the top transaction so that it lasts until commit or abort; the
    // previous resource owner is put back on both paths (on ERROR, abort resets it).
    unsafe {
        let saved = pg_sys::CurrentResourceOwner;
        pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
        pg_sys::LockAcquire(&t, pg_sys::AccessShareLock as pg_sys::LOCKMODE, false, false);
        pg_sys::CurrentResourceOwner = saved;
    }
    MARKED.with(|m| m.set(Some(lxid)));
}

/// Other transactions that hold audit ids now (this backend's own is never listed).
pub fn holders(ext: Oid) -> Vec<Writer> {
    let t = tag(ext);
    let mut count = 0i32;
    // SAFETY: GetLockConflicts returns a palloc'd array of `count` valid entries and
    // leaves out the caller's own locks; we copy them out before returning.
    unsafe {
        let arr = pg_sys::GetLockConflicts(
            &t,
            pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
            &mut count,
        );
        let mut v = Vec::with_capacity(count.max(0) as usize);
        for i in 0..count.max(0) as usize {
            v.push(pack(*arr.add(i)));
        }
        v
    }
}

fn pack(v: pg_sys::VirtualTransactionId) -> Writer {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    let slot = v.backendId;
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    let slot = v.procNumber;
    Writer(((slot as i64) << 32) | v.localTransactionId as i64)
}

fn unpack(w: Writer) -> pg_sys::VirtualTransactionId {
    let slot = (w.0 >> 32) as i32;
    let lxid = (w.0 & 0xffff_ffff) as u32;
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    return pg_sys::VirtualTransactionId { backendId: slot, localTransactionId: lxid };
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    return pg_sys::VirtualTransactionId { procNumber: slot, localTransactionId: lxid };
}

/// Has `w` ended? Never waits.
pub fn finished(w: Writer) -> bool {
    // SAFETY: VirtualXactLock with wait = false only tests the transaction's state.
    unsafe { pg_sys::VirtualXactLock(unpack(w), false) }
}

/// Waits until `w` has ended, as CREATE INDEX CONCURRENTLY waits for older
/// transactions: through the lock manager, so lock_timeout, statement_timeout
/// and the deadlock detector all apply.
pub fn wait_for(w: Writer) {
    // SAFETY: VirtualXactLock with wait = true sleeps on the transaction's lock and
    // raises an ERROR on timeout, cancel or deadlock.
    unsafe {
        pg_sys::VirtualXactLock(unpack(w), true);
    }
}
