//! The shared queue between reading backends and the worker: a fixed array of
//! record slots in shared memory, sized by `audit.access_queue_size` at server
//! start, under one LWLock. A backend copies its record into a free slot and
//! wakes the launcher; each database's worker takes its own database's records
//! in the order they were queued. Nothing here allocates or runs SQL.
//!
//! The queue outlives the memory it is in. When the postmaster lets go of
//! shared memory (shutdown of any kind, or the reset after a backend crashed),
//! it writes the queued records to a spool file, and the next start loads them
//! back. What no file can keep are the reads of statements still running when
//! the server stopped abruptly (an immediate shutdown, a crash, a postmaster that
//! died outright, which also loses the queue itself): the next start finds out
//! (the control file, a marker file, or a second initialization of the same
//! postmaster), and each database's worker then writes a row saying that reads
//! of that moment may be missing, their count unknown.

use std::ffi::CStr;
use std::ptr;

use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;

use super::record::Record;

const TRANCHE: &CStr = c"audit_ext access queue";
const SHMEM_NAME: &CStr = c"audit_ext access queue";
/// AddinShmemInitLock's index in MainLWLockArray (lwlocknames.h, the same in 15 to 18).
const ADDIN_SHMEM_INIT_LOCK: usize = 21;

/// What the queue's scans read of a slot, kept apart from the 4 KiB records so
/// that a scan of the whole queue (take, pending, a free-slot search) reads a few
/// contiguous bytes per slot instead of one cache line in every record.
#[repr(C)]
#[derive(Clone, Copy)]
struct Meta {
    /// 0 while the slot is free.
    seq: u64,
    db: Oid,
}

#[repr(C)]
struct Shared {
    capacity: usize,
    used: usize,
    next_seq: u64,
    /// Where the next free-slot search starts.
    hint: usize,
    /// The launcher's latch (null before it runs), set when a record is queued
    /// while the launcher is idle.
    launcher_latch: *mut pg_sys::Latch,
    /// Set by the launcher, under the lock, as it looks at the queue one last time
    /// before it sleeps; the first record queued after that wakes it and clears it.
    /// Setting the latch for every record instead costs a signal per read and
    /// wakes the launcher for nothing while it waits on a worker.
    launcher_idle: bool,
    /// The worker writing one database's records (drainer_db) stays while they keep
    /// coming, and sleeps on its latch when there are none: the same idle flag
    /// wakes it. Starting a worker per burst of reads cost more than writing them.
    drainer_latch: *mut pg_sys::Latch,
    drainer_db: Oid,
    drainer_idle: bool,
    /// When this server started after one that stopped without saving its queue
    /// (0: it did not), and the databases whose workers have said so.
    unclean_since: pg_sys::TimestampTz,
    unclean_told: [Oid; MAX_TOLD],
    /// `capacity` Metas, then `capacity` Records (see meta_at, rec_at).
    slots: [Meta; 0],
}

/// Databases whose unclean-stop row is remembered; beyond that a worker may write
/// the row twice, never zero times.
const MAX_TOLD: usize = 64;
/// Where the queue waits while the server is down, and the marker of a running
/// server (both in $PGDATA, the postmaster's working directory).
const SPOOL: &str = "pg_stat/audit_ext_queue.spool";
const RUNNING: &str = "pg_stat/audit_ext_queue.running";
/// A spool file starts with this, then the record size and count (u64 each).
const SPOOL_MAGIC: &[u8; 8] = b"AUDQ0001";

static mut SHARED: *mut Shared = ptr::null_mut();
/// How many times this postmaster has made the queue: more than once means it is
/// starting over after a backend crashed.
static mut INITIALIZED: u32 = 0;
static mut LOCK: *mut pg_sys::LWLock = ptr::null_mut();

fn bytes_for(capacity: usize) -> usize {
    records_offset(capacity) + capacity * std::mem::size_of::<Record>()
}

/// Where the records start: after the header and the Metas, aligned for a Record.
fn records_offset(capacity: usize) -> usize {
    let end = std::mem::size_of::<Shared>() + capacity * std::mem::size_of::<Meta>();
    end.next_multiple_of(std::mem::align_of::<Record>())
}

/// Slot `i`'s Meta.
///
/// # Safety
/// `s` must point to the attached queue and `i` be below its capacity.
unsafe fn meta_at(s: *mut Shared, i: usize) -> *mut Meta {
    // SAFETY: the caller's contract; the Metas follow the header.
    unsafe { ptr::addr_of_mut!((*s).slots).cast::<Meta>().add(i) }
}

/// Slot `i`'s Record.
///
/// # Safety
/// As [`meta_at`].
unsafe fn rec_at(s: *mut Shared, i: usize) -> *mut Record {
    // SAFETY: the caller's contract; bytes_for() reserved room for capacity Records there.
    unsafe { s.cast::<u8>().add(records_offset((*s).capacity)).cast::<Record>().add(i) }
}

/// From the shmem_request hook: the queue's memory and its lock.
pub fn request(capacity: usize) {
    // SAFETY: called from shmem_request_hook in the postmaster, where these are allowed.
    unsafe {
        pg_sys::RequestAddinShmemSpace(bytes_for(capacity));
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
    }
}

/// From the shmem_startup hook (postmaster and, under EXEC_BACKEND, each backend).
pub fn attach(capacity: usize) {
    // SAFETY: the standard add-in start-up sequence under AddinShmemInitLock; the
    // struct is initialized once, by whoever finds it new.
    unsafe {
        // AddinShmemInitLock is MainLWLockArray[21] (lwlocknames.h), which pgrx does not name.
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let p = pg_sys::ShmemInitStruct(SHMEM_NAME.as_ptr(), bytes_for(capacity), &mut found)
            .cast::<Shared>();
        if !found {
            ptr::write_bytes(p.cast::<u8>(), 0, bytes_for(capacity));
            (*p).capacity = capacity;
            (*p).next_seq = 1;
        }
        SHARED = p;
        LOCK = &mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock;
        if !found && !pg_sys::IsUnderPostmaster {
            // The postmaster, creating shared memory (at start, or after a crash).
            restore(p);
            pg_sys::on_shmem_exit(Some(save_on_exit), pg_sys::Datum::from(0));
        }
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Loads the spool a previous run left, and notes an unclean stop.
///
/// # Safety
/// `p` must be the new, initialized queue, not yet visible to any other process.
unsafe fn restore(p: *mut Shared) {
    // SAFETY: p is ours alone (caller's contract); INITIALIZED is the postmaster's own.
    let (s, restarted) = unsafe {
        INITIALIZED += 1;
        (&mut *p, INITIALIZED > 1)
    };
    if restarted || std::path::Path::new(RUNNING).exists() || !stopped_cleanly() {
        // SAFETY: a plain clock read.
        s.unclean_since = unsafe { pg_sys::GetCurrentTimestamp() };
    }
    let _ = std::fs::write(RUNNING, b"");
    let Ok(bytes) = std::fs::read(SPOOL) else { return };
    let _ = std::fs::remove_file(SPOOL);
    let size = std::mem::size_of::<Record>();
    let header = SPOOL_MAGIC.len() + 16;
    if bytes.len() < header || &bytes[..8] != SPOOL_MAGIC {
        return;
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    let (rec_size, count) = (word(8) as usize, word(16) as usize);
    if rec_size != size || bytes.len() != header + count * size {
        return; // another build's layout: the records cannot be read back
    }
    for (i, chunk) in bytes[header..].chunks_exact(size).take(s.capacity).enumerate() {
        // SAFETY: i < capacity; the bytes are a Record of this layout (checked above),
        // written by save_on_exit from a Record.
        unsafe {
            ptr::copy_nonoverlapping(chunk.as_ptr(), rec_at(s, i).cast::<u8>(), size);
            *meta_at(s, i) = Meta { seq: s.next_seq, db: (*rec_at(s, i)).h.db };
        }
        s.next_seq += 1;
        s.used += 1;
    }
}

/// Whether the control file says the server last stopped cleanly (a shutdown
/// checkpoint, on a primary or a standby). Read as bytes, before the startup
/// process touches it: `state` follows three fields every version has.
fn stopped_cleanly() -> bool {
    let Ok(bytes) = std::fs::read("global/pg_control") else { return true };
    let at = std::mem::offset_of!(pg_sys::ControlFileData, state);
    let Some(raw) = bytes.get(at..at + 4) else { return true };
    let state = u32::from_ne_bytes(raw.try_into().unwrap_or_default());
    state == pg_sys::DBState::DB_SHUTDOWNED || state == pg_sys::DBState::DB_SHUTDOWNED_IN_RECOVERY
}

/// The postmaster, letting go of shared memory: the queued records go to the
/// spool, in queue order, and the running marker is removed.
#[pg_guard]
unsafe extern "C-unwind" fn save_on_exit(_code: i32, _arg: pg_sys::Datum) {
    // SAFETY: the postmaster's own mapping of the queue, still attached while the
    // on_shmem_exit callbacks run; no backend runs any more. A backend that died
    // while copying left its slot's seq at 0 (seq is set after the copy).
    unsafe {
        let s = SHARED;
        let mut full: Vec<(u64, usize)> = (0..(*s).capacity)
            .filter_map(|i| {
                let seq = (*meta_at(s, i)).seq;
                (seq != 0).then_some((seq, i))
            })
            .collect();
        full.sort_unstable();
        if !full.is_empty() {
            let size = std::mem::size_of::<Record>();
            let mut out = Vec::with_capacity(24 + full.len() * size);
            out.extend_from_slice(SPOOL_MAGIC);
            out.extend_from_slice(&(size as u64).to_le_bytes());
            out.extend_from_slice(&(full.len() as u64).to_le_bytes());
            for (_, i) in full {
                let rec = rec_at(s, i).cast::<u8>();
                out.extend_from_slice(std::slice::from_raw_parts(rec, size));
            }
            // Written whole, then renamed: a half-written spool is never read.
            let tmp = format!("{SPOOL}.tmp");
            if std::fs::write(&tmp, &out).is_ok() {
                let _ = std::fs::rename(&tmp, SPOOL);
            }
        }
        let _ = std::fs::remove_file(RUNNING);
        SHARED = ptr::null_mut();
    }
}

/// When this server started after one that stopped without saving its queue,
/// the first time `db`'s worker asks (None afterwards, and when it did not).
pub fn unclean_stop_to_tell(db: Oid) -> Option<pg_sys::TimestampTz> {
    let q = Locked::take()?;
    // SAFETY: we hold the lock.
    unsafe {
        let s = &mut *q.0;
        if s.unclean_since == 0 || s.unclean_told.contains(&db) {
            return None;
        }
        if let Some(free) = s.unclean_told.iter_mut().find(|o| **o == pg_sys::InvalidOid) {
            *free = db;
        }
        Some(s.unclean_since)
    }
}

/// Whether the queue exists in this server (the library was preloaded).
pub fn ready() -> bool {
    // SAFETY: a plain read of a pointer set once at start-up.
    unsafe { !SHARED.is_null() }
}

/// Holds the queue's lock; released on drop, and by LWLockReleaseAll on ERROR.
struct Locked(*mut Shared);

impl Locked {
    fn take() -> Option<Locked> {
        if !ready() {
            return None;
        }
        // SAFETY: LOCK was set with SHARED; an LWLock wait is interruptible only by
        // process death, and the critical sections below neither fail nor allocate.
        unsafe {
            pg_sys::LWLockAcquire(LOCK, pg_sys::LWLockMode::LW_EXCLUSIVE);
            Some(Locked(SHARED))
        }
    }
    fn meta(&self, i: usize) -> *mut Meta {
        // SAFETY: the queue is attached (take() checked) and callers pass i < capacity.
        unsafe { meta_at(self.0, i) }
    }
    fn rec(&self, i: usize) -> *mut Record {
        // SAFETY: as meta().
        unsafe { rec_at(self.0, i) }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: we hold the lock (take() acquired it).
        unsafe { pg_sys::LWLockRelease(LOCK) };
    }
}

/// Queues a copy of `rec`. False when the queue is full (nothing was queued).
pub fn push(rec: &Record) -> bool {
    let latch = {
        let Some(q) = Locked::take() else { return false };
        // SAFETY: we hold the lock; every index is below capacity.
        unsafe {
            let s = &mut *q.0;
            if s.used >= s.capacity {
                // Full: the launcher must be awake to make room, whoever woke it last.
                let latch = s.launcher_latch;
                drop(q);
                if !latch.is_null() {
                    pg_sys::SetLatch(latch);
                }
                return false;
            }
            let mut i = s.hint % s.capacity;
            while (*q.meta(i)).seq != 0 {
                i = (i + 1) % s.capacity;
            }
            copy_used(rec, q.rec(i));
            // seq last: a slot whose copy was interrupted stays free.
            *q.meta(i) = Meta { seq: s.next_seq, db: rec.h.db };
            s.next_seq += 1;
            s.used += 1;
            s.hint = i + 1;
            // A sleeping drainer is woken by any record: its own database's to write,
            // another's to make way for that database's worker.
            let drainer = if std::mem::replace(&mut s.drainer_idle, false) {
                s.drainer_latch
            } else {
                ptr::null_mut()
            };
            let launcher = if std::mem::replace(&mut s.launcher_idle, false) {
                s.launcher_latch
            } else {
                ptr::null_mut()
            };
            [drainer, launcher]
        }
    };
    for latch in latch.into_iter().filter(|l| !l.is_null()) {
        // SAFETY: these latches live in their process's PGPROC, in shared memory, for
        // the server's life; SetLatch may be called on another process's latch.
        unsafe { pg_sys::SetLatch(latch) };
    }
    true
}

/// Whether records wait: (of database `db`, of any other database).
fn pending_in(s: *mut Shared, db: Oid) -> (bool, bool) {
    let (mut mine, mut others) = (false, false);
    // SAFETY: the caller holds the lock on the attached queue.
    for i in 0..unsafe { (*s).capacity } {
        // SAFETY: every index is below capacity.
        let m = unsafe { *meta_at(s, i) };
        if m.seq != 0 {
            if m.db == db {
                mine = true;
            } else {
                others = true;
            }
            if mine && others {
                break;
            }
        }
    }
    (mine, others)
}

/// Whether records wait: (of `db`, of any other database).
pub fn pending(db: Oid) -> (bool, bool) {
    let Some(q) = Locked::take() else { return (false, false) };
    pending_in(q.0, db)
}

/// By the worker writing `db`'s records, before it sleeps on `latch`: the next
/// record queued sets it. Returns [`pending`] as it stood then, under the same
/// lock, so no record can slip in unseen between the look and the sleep.
pub fn drainer_going_idle(db: Oid, latch: *mut pg_sys::Latch) -> (bool, bool) {
    let Some(q) = Locked::take() else { return (false, false) };
    // SAFETY: we hold the lock.
    unsafe {
        let s = &mut *q.0;
        s.drainer_latch = latch;
        s.drainer_db = db;
        s.drainer_idle = true;
        pending_in(q.0, db)
    }
}

/// By the drainer as it exits: its latch is not to be set any more.
pub fn drainer_gone() {
    if let Some(q) = Locked::take() {
        // SAFETY: we hold the lock.
        unsafe {
            let s = &mut *q.0;
            s.drainer_latch = ptr::null_mut();
            s.drainer_db = pg_sys::InvalidOid;
            s.drainer_idle = false;
        }
    }
}

/// Takes up to `max` of `db`'s records, oldest first, into `buf[..n]`; returns
/// n. The worker keeps `buf` from batch to batch (it only grows), so that a
/// batch allocates nothing: fresh 4 KiB records cost page faults.
pub fn take(db: Oid, max: usize, buf: &mut Vec<Record>) -> usize {
    let Some(q) = Locked::take() else { return 0 };
    let mut found: Vec<(u64, usize)> = Vec::new();
    // SAFETY: we hold the lock; every index is below capacity. Each record is copied
    // over an initialized Record of `buf`, as many bytes as it uses (see used_bytes).
    unsafe {
        let s = &mut *q.0;
        for i in 0..s.capacity {
            let m = *q.meta(i);
            if m.seq != 0 && m.db == db {
                found.push((m.seq, i));
            }
        }
        found.sort_unstable();
        found.truncate(max);
        if buf.len() < found.len() {
            buf.resize(found.len(), *Record::new(super::record::Kind::Read));
        }
        for (k, &(_, i)) in found.iter().enumerate() {
            copy_used(q.rec(i), &mut buf[k]);
            (*q.meta(i)).seq = 0;
        }
        s.used -= found.len();
    }
    found.len()
}

/// Copies the bytes of a record that are in use: its header and its texts, a few
/// hundred bytes of the 4 KiB, under the queue's lock both ways.
///
/// # Safety
/// `from` must point to a record written whole by [`push`] (or read back from the
/// spool); `to` must not overlap it.
unsafe fn copy_used(from: *const Record, to: *mut Record) {
    // SAFETY: the caller's contract; used_bytes() is at most size_of::<Record>().
    unsafe {
        let n = (*from).used_bytes();
        ptr::copy_nonoverlapping(from.cast::<u8>(), to.cast::<u8>(), n);
    }
}

/// The databases that have records waiting.
pub fn waiting_databases() -> Vec<Oid> {
    waiting(false)
}

/// [`waiting_databases`], by the launcher just before it sleeps: from here on the
/// next queued record sets its latch, so none waits for the end of its nap.
pub fn waiting_databases_before_sleep() -> Vec<Oid> {
    waiting(true)
}

fn waiting(going_idle: bool) -> Vec<Oid> {
    let Some(q) = Locked::take() else { return Vec::new() };
    let mut dbs = Vec::new();
    // SAFETY: we hold the lock; every index is below capacity.
    unsafe {
        if going_idle {
            (*q.0).launcher_idle = true;
        }
        for i in 0..(*q.0).capacity {
            let m = *q.meta(i);
            if m.seq != 0 && !dbs.contains(&m.db) {
                dbs.push(m.db);
            }
        }
    }
    dbs
}

/// Called by the launcher: where to wake it when records arrive.
pub fn set_launcher_latch(latch: *mut pg_sys::Latch) {
    if let Some(q) = Locked::take() {
        // SAFETY: we hold the lock.
        unsafe { (*q.0).launcher_latch = latch };
    }
}
