//! The log writer: inserts audit rows straight into the right partition of
//! `audit.log` through PostgreSQL's own routing, heap and index functions, the
//! way COPY FROM does. An executor per row (SPI) spent more time setting up and
//! tearing down partition routing than storing the row.
//!
//! One writer per transaction: it is opened at the transaction's first audit
//! row, under the top transaction's resource owner so that subtransactions
//! neither release nor warn about it, and closed before commit. Anything
//! unusual about a partition (a user's row trigger, a foreign table, a
//! different column layout) makes the caller fall back to a plain INSERT.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void};

use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::prelude::*;

// executor/execPartition.h, which pgrx does not bind. Called only through
// `guarded`, which turns a PostgreSQL ERROR into a Rust panic at the boundary.
unsafe extern "C-unwind" {
    fn ExecSetupPartitionTupleRouting(
        estate: *mut pg_sys::EState,
        rel: pg_sys::Relation,
    ) -> *mut c_void;
    fn ExecFindPartition(
        mtstate: *mut pg_sys::ModifyTableState,
        root: *mut pg_sys::ResultRelInfo,
        proute: *mut c_void,
        slot: *mut pg_sys::TupleTableSlot,
        estate: *mut pg_sys::EState,
    ) -> *mut pg_sys::ResultRelInfo;
    fn ExecCleanupTupleRouting(mtstate: *mut pg_sys::ModifyTableState, proute: *mut c_void);
}

/// Runs `f` (a call into PostgreSQL not bound by pgrx) behind pgrx's longjmp guard.
///
/// # Safety
/// `f` must be safe to call on the backend's main thread; a PostgreSQL ERROR
/// inside it becomes a Rust panic, so it must hold nothing that a panic leaks.
unsafe fn guarded<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: called on the backend's main thread, as every trigger is.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(f) }
}

struct Sink {
    log: Oid,
    estate: *mut pg_sys::EState,
    mtstate: *mut pg_sys::ModifyTableState,
    root: *mut pg_sys::ResultRelInfo,
    proute: *mut c_void,
    slot: *mut pg_sys::TupleTableSlot,
    /// Partitions already checked: (oid, whether rows can go straight in).
    leaves: Vec<(Oid, bool)>,
    /// Rows kept for one multi-insert into `buffered_leaf` (see [`insert_buffered`]):
    /// `buffer[..buffered]` hold them; the slots are made once and reused.
    buffer: Vec<*mut pg_sys::TupleTableSlot>,
    buffered: usize,
    buffered_leaf: *mut pg_sys::ResultRelInfo,
    /// The command id the kept rows are written with: the one current when they
    /// were kept, so that a flush sees to it that they are visible exactly where
    /// rows written at once would have been (see [`insert_buffered`]).
    buffered_cid: pg_sys::CommandId,
    /// The kept rows' tuple bytes, to bound the buffer's memory by size too.
    buffered_bytes: usize,
}

/// Rows one multi-insert takes at most: the worker's batch, so that a batch
/// of read records is one heap write per page, and memory stays bounded by it.
pub const MULTI_INSERT_ROWS: usize = 1_000;

/// Tuple bytes one multi-insert takes at most: a few rows with large images
/// (a changed 5 MB column) are written as soon as they pass it, so the
/// buffer's memory is bounded by this and one row, never by a statement's size.
pub const MULTI_INSERT_BYTES: usize = 1 << 20;

thread_local! {
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
    /// Set by invalidations: close and reopen before the next row.
    static STALE: Cell<bool> = const { Cell::new(false) };
    /// Set while a row is written: still set at the next row if an error interrupted it.
    static BUSY: Cell<bool> = const { Cell::new(false) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// The subtransaction whose rows are buffered.
    static BUFFER_SUBXACT: Cell<pg_sys::SubTransactionId> = const { Cell::new(0) };
}

#[cfg(any(test, feature = "pg_test"))]
thread_local! {
    /// Multi-inserts this backend has made, for tests that a statement's rows are batched.
    static MULTI_INSERTS: Cell<u64> = const { Cell::new(0) };
}

/// How many multi-inserts this backend has made (tests only).
#[cfg(any(test, feature = "pg_test"))]
pub fn multi_inserts() -> u64 {
    MULTI_INSERTS.with(|m| m.get())
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PARALLEL_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => {
            release()
        }
        // Abort releases the relations and frees the memory (buffered rows too,
        // which belong to the aborted transaction): only forget them.
        _ => {
            SINK.with(|s| s.replace(None));
            STALE.with(|s| s.set(false));
            BUSY.with(|b| b.set(false));
        }
    }
}

/// Buffered rows belong to the subtransaction that buffered them: written before
/// it commits, gone when it aborts (as rows inserted at once would be).
#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_PRE_COMMIT_SUB => flush(),
        SUBXACT_EVENT_ABORT_SUB => SINK.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                if let Some(s) = s.as_mut() {
                    if s.buffered > 0 && BUFFER_SUBXACT.with(|b| b.get()) >= my_subid {
                        // SAFETY: the slots are this writer's; clearing frees their tuples.
                        unsafe { discard(s) };
                    }
                }
            }
        }),
        _ => {}
    }
}

/// Relcache invalidation for `relid` (InvalidOid: all): the writer's routing or
/// index lists may be out of date.
#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: Datum, relid: Oid) {
    let hit = SINK.with(|s| match s.try_borrow() {
        Ok(s) => s.as_ref().is_some_and(|s| {
            relid == pg_sys::InvalidOid
                || relid == s.log
                || s.leaves.iter().any(|&(o, _)| o == relid)
        }),
        Err(_) => true,
    });
    if hit {
        STALE.with(|s| s.set(true));
    }
}

/// Closes the writer, if open. Called before commit, and before the extension
/// itself changes or drops partitions in this transaction.
pub fn release() {
    flush();
    if buffered() > 0 {
        // Only at the top transaction's end can rows of another level remain (every
        // subtransaction has ended, writing or dropping its own): they are its rows.
        write_kept();
    }
    if let Some(sink) = SINK.with(|s| s.replace(None)) {
        // SAFETY: the writer was opened in this transaction and is closed once.
        unsafe { close(sink) };
    }
    STALE.with(|s| s.set(false));
    BUSY.with(|b| b.set(false));
}

/// Closes the writer between two statements of a transaction, before a utility
/// statement that may need audit.log's relations closed: PostgreSQL refuses to
/// truncate, alter, index, cluster or drop a relation that this session holds
/// open ("in use by active queries in this session"), and the writer holds the
/// log, its partitions and their indexes open until the transaction ends. The
/// next row opens it again. It stays open while rows of an enclosing
/// subtransaction are kept (they must be written in it, when it resumes), and
/// while it is at work (a statement run from inside it).
pub fn close_between_statements() {
    flush();
    if buffered() > 0 {
        return;
    }
    let Some(sink) = SINK.with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.take())) else {
        return;
    };
    // SAFETY: the writer was opened in this transaction and is closed once; it is
    // not at work (its cell could be borrowed) and holds no rows.
    unsafe { close(sink) };
    STALE.with(|s| s.set(false));
    BUSY.with(|b| b.set(false));
}

/// # Safety
/// `s` must have been opened by [`open`] in the current transaction.
unsafe fn close(s: Sink) {
    // SAFETY: every pointer was created by open() in this transaction and is still owned by it;
    // references are given back to the owner that holds them.
    unsafe {
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
        let _guard = RestoreOwner(owner);
        guarded(|| ExecCleanupTupleRouting(s.mtstate, s.proute));
        pg_sys::ExecDropSingleTupleTableSlot(s.slot);
        for &b in &s.buffer {
            pg_sys::ExecDropSingleTupleTableSlot(b);
        }
        pg_sys::ExecCloseIndices(s.root);
        pg_sys::table_close((*s.root).ri_RelationDesc, pg_sys::NoLock as i32);
        pg_sys::FreeExecutorState(s.estate);
    }
}

/// # Safety
/// Must run inside a transaction, with `CurrentResourceOwner` set to the
/// top transaction's (see [`insert`]); `log` and `log_default` are audit.log's oids.
unsafe fn open(log: Oid, log_default: Oid) -> Sink {
    if !REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: static callbacks, registered once per backend.
        unsafe {
            pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
            pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), Datum::from(0));
        }
    }
    // SAFETY: standard executor set-up, as CopyFrom does it, in the top transaction's memory.
    unsafe {
        let old_cxt = pg_sys::MemoryContextSwitchTo(pg_sys::TopTransactionContext);
        let estate = pg_sys::CreateExecutorState();
        pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
        let rel = pg_sys::table_open(log, pg_sys::RowExclusiveLock as i32);
        // The default partition too, before any row is routed, in the order maintain()
        // locks them. Routing then sees every partition maintain() attached before we
        // got the lock: routed first and locked after, a row bound for the default
        // partition would fail its changed constraint (23514) once maintain() attached
        // the partition it belongs to while we waited.
        pg_sys::LockRelationOid(log_default, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let root = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            .cast::<pg_sys::ResultRelInfo>();
        (*root).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(root, rel, 0, std::ptr::null_mut(), 0);
        let mtstate = pg_sys::palloc0(std::mem::size_of::<pg_sys::ModifyTableState>())
            .cast::<pg_sys::ModifyTableState>();
        (*mtstate).ps.type_ = pg_sys::NodeTag::T_ModifyTableState;
        (*mtstate).ps.state = estate;
        (*mtstate).operation = pg_sys::CmdType::CMD_INSERT;
        (*mtstate).mt_nrels = 1;
        (*mtstate).resultRelInfo = root;
        (*mtstate).rootResultRelInfo = root;
        let proute = guarded(|| ExecSetupPartitionTupleRouting(estate, rel));
        let slot = pg_sys::MakeSingleTupleTableSlot((*rel).rd_att, &pg_sys::TTSOpsVirtual);
        pg_sys::MemoryContextSwitchTo(old_cxt);
        Sink {
            log,
            estate,
            mtstate,
            root,
            proute,
            slot,
            leaves: Vec::new(),
            buffer: Vec::new(),
            buffered: 0,
            buffered_leaf: std::ptr::null_mut(),
            buffered_cid: pg_sys::CommandId::MAX, // InvalidCommandId
            buffered_bytes: 0,
        }
    }
}

/// Whether rows can go straight into this partition: a plain table, no row
/// triggers, no row-level security, and the parent's column layout.
///
/// # Safety
/// Both must be open result relations of this transaction's writer.
unsafe fn direct_ok(root: *mut pg_sys::ResultRelInfo, leaf: *mut pg_sys::ResultRelInfo) -> bool {
    // SAFETY: both are open result relations of this writer.
    unsafe {
        // Row-level security on the log (even the owner's, if forced) is the executor's to apply.
        if (*(*(*root).ri_RelationDesc).rd_rel).relrowsecurity {
            return false;
        }
        let rel = (*leaf).ri_RelationDesc;
        if (*(*rel).rd_rel).relrowsecurity
            || (*(*rel).rd_rel).relkind != pg_sys::RELKIND_RELATION as c_char
            || !(*leaf).ri_FdwRoutine.is_null()
        {
            return false;
        }
        let trig = (*leaf).ri_TrigDesc;
        if !trig.is_null()
            && ((*trig).trig_insert_before_row
                || (*trig).trig_insert_after_row
                || (*trig).trig_insert_instead_row)
        {
            return false;
        }
        let a = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let b = pgrx::PgTupleDesc::from_pg_unchecked((*(*root).ri_RelationDesc).rd_att);
        a.len() == b.len()
            && a.iter().zip(b.iter()).all(|(x, y)| {
                x.attisdropped == y.attisdropped && (x.attisdropped || x.atttypid == y.atttypid)
            })
    }
}

/// Inserts one row into `log` (the extension owner must be the current user).
/// Returns false, having written nothing, when the row's partition needs the
/// executor's full INSERT.
///
/// # Safety
/// `values` must be valid datums of `audit.log`'s column types, in column order.
pub unsafe fn insert(log: Oid, log_default: Oid, values: &[Datum], nulls: &[bool]) -> bool {
    // Rows this subtransaction kept before this one are written first, in order.
    flush();
    // SAFETY: forwarded from the caller.
    unsafe { insert_now(log, log_default, values, nulls) }
}

/// [`insert`] without writing the kept rows first.
///
/// # Safety
/// As [`insert`].
unsafe fn insert_now(log: Oid, log_default: Oid, values: &[Datum], nulls: &[bool]) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe { ensure_open(log, log_default) };
    // An error below leaves the writer half-used: it is reopened before the next row.
    BUSY.with(|b| b.set(true));
    let done = SINK.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.as_mut().expect("opened above");
        // SAFETY: the slot has the parent's descriptor; values match it (caller's contract).
        unsafe { write(s, values, nulls) }
    });
    BUSY.with(|b| b.set(false));
    done
}

/// Like [`insert`], but the row may be kept and written later with others in
/// one multi-insert (heap_multi_insert: one heap write per page, as COPY does),
/// then its index entries. The rows are written, in order, by [`flush`], by the
/// next [`insert`], when the buffer is full or the partition changes, and
/// before the subtransaction that buffered them commits; they vanish if it
/// aborts. Each row is written with the command id that was current when it
/// was kept (rows kept under different ones are written in separate
/// multi-inserts): a flush that comes after the command counter has moved on
/// (at the start of a nested statement) leaves the rows visible to exactly the
/// commands that would have seen them written at once. Returns false, having written nothing (and flushed what was kept),
/// when the row's partition needs the executor's full INSERT. A caller flushes
/// before it starts a subtransaction: rows kept across one wait for their own
/// level, unless the writer must be reopened meanwhile (an invalidation), which
/// writes them first, in the inner subtransaction.
///
/// # Safety
/// As [`insert`]. The datums need not outlive the call: the row is copied.
pub unsafe fn insert_buffered(
    log: Oid,
    log_default: Oid,
    values: &[Datum],
    nulls: &[bool],
) -> bool {
    // SAFETY: a plain read of the current subtransaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    if buffered() > 0 && BUFFER_SUBXACT.with(|b| b.get()) != subxact {
        // The rows kept belong to an enclosing subtransaction and must be written
        // in it, once it resumes: written here, they would go if this one aborted.
        // This row is written at once, in its own subtransaction.
        // SAFETY: forwarded from the caller.
        return unsafe { insert_now(log, log_default, values, nulls) };
    }
    // SAFETY: forwarded from the caller.
    unsafe { ensure_open(log, log_default) };
    BUSY.with(|b| b.set(true));
    let done = SINK.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.as_mut().expect("opened above");
        // SAFETY: as in insert().
        unsafe { buffer(s, values, nulls) }
    });
    BUSY.with(|b| b.set(false));
    match done {
        Buffered::Kept => BUFFER_SUBXACT.with(|b| b.set(subxact)),
        Buffered::Full => {
            BUFFER_SUBXACT.with(|b| b.set(subxact));
            flush();
        }
        Buffered::NotDirect => {}
    }
    !matches!(done, Buffered::NotDirect)
}

/// Rows kept now; 0 while the writer is at work: a statement started from
/// inside it (a log partition's constraint calling a SQL function) must not
/// flush under it; the writer's own operation writes or keeps its rows.
pub fn buffered() -> usize {
    SINK.with(|s| s.try_borrow().ok().and_then(|s| s.as_ref().map(|s| s.buffered)).unwrap_or(0))
}

/// Writes the rows kept by the current subtransaction, if any (rows an
/// enclosing one kept wait until it resumes; see [`insert_buffered`]).
pub fn flush() {
    // SAFETY: a plain read of the current subtransaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    if buffered() > 0 && BUFFER_SUBXACT.with(|b| b.get()) == subxact {
        write_kept();
    }
}

fn write_kept() {
    BUSY.with(|b| b.set(true));
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.as_mut().expect("checked above");
        // SAFETY: the buffer holds rows of this transaction's open writer.
        unsafe { write_buffered(s) }
    });
    BUSY.with(|b| b.set(false));
}

/// Opens this transaction's writer for `log`, or reopens it after an
/// invalidation, an interrupted row or a switch of log.
///
/// # Safety
/// As [`insert`].
unsafe fn ensure_open(log: Oid, log_default: Oid) {
    if STALE.with(|s| s.get())
        || BUSY.with(|b| b.get())
        || SINK.with(|s| s.borrow().as_ref().is_some_and(|s| s.log != log))
    {
        release();
    }
    if SINK.with(|s| s.borrow().is_none()) {
        // SAFETY: relations are opened under the top transaction's resource owner,
        // so that they outlive the subtransaction we may be in.
        let sink = unsafe {
            let owner = pg_sys::CurrentResourceOwner;
            pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
            let guard = RestoreOwner(owner);
            let s = open(log, log_default);
            drop(guard);
            s
        };
        SINK.with(|s| *s.borrow_mut() = Some(sink));
    }
}

/// Puts the row in the writer's routing slot and finds its partition: None
/// (the slot cleared) when the row needs the executor's INSERT. Runs under the
/// top transaction's owner (the caller's guard): routing may open the partition.
///
/// # Safety
/// `s` must be this transaction's open writer; `values` and `nulls` must be
/// audit.log's columns in table order.
unsafe fn route(
    s: &mut Sink,
    values: &[Datum],
    nulls: &[bool],
) -> Option<*mut pg_sys::ResultRelInfo> {
    // SAFETY: see insert(); every pointer belongs to this transaction's open writer.
    unsafe {
        let slot = s.slot;
        pg_sys::ExecClearTuple(slot);
        let n = (*(*slot).tts_tupleDescriptor).natts as usize;
        if n != values.len() || n != nulls.len() {
            return None; // audit.log has gained or lost columns: the INSERT maps them by name
        }
        std::ptr::copy_nonoverlapping(values.as_ptr(), (*slot).tts_values, n);
        std::ptr::copy_nonoverlapping(nulls.as_ptr(), (*slot).tts_isnull, n);
        pg_sys::ExecStoreVirtualTuple(slot);
        let leaf = guarded(|| ExecFindPartition(s.mtstate, s.root, s.proute, slot, s.estate));
        let oid = (*(*leaf).ri_RelationDesc).rd_id;
        let ok = match s.leaves.iter().find(|&&(o, _)| o == oid) {
            Some(&(_, ok)) => ok,
            None => {
                let ok = direct_ok(s.root, leaf);
                s.leaves.push((oid, ok));
                ok
            }
        };
        if !ok {
            pg_sys::ExecClearTuple(slot);
            return None;
        }
        if !(*(*(*leaf).ri_RelationDesc).rd_att).constr.is_null() {
            pg_sys::ExecConstraints(leaf, slot, s.estate);
        }
        Some(leaf)
    }
}

/// The index entries of a row stored from `slot` (its tid set by the table AM).
///
/// # Safety
/// `leaf` must be an open result relation of writer `s`, `slot` a stored row of it.
unsafe fn insert_index_entries(
    s: &Sink,
    leaf: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
) {
    // SAFETY: the caller's contract.
    unsafe {
        if (*leaf).ri_NumIndices > 0 {
            // No speculative-conflict flag, no arbiter indexes: a plain insert, as COPY does.
            let (spec, arbiters) = (std::ptr::null_mut(), std::ptr::null_mut());
            // PostgreSQL 16 added the onlySummarizing argument.
            #[cfg(feature = "pg15")]
            pg_sys::ExecInsertIndexTuples(leaf, slot, s.estate, false, false, spec, arbiters);
            #[cfg(not(feature = "pg15"))]
            pg_sys::ExecInsertIndexTuples(
                leaf, slot, s.estate, false, false, spec, arbiters, false,
            );
        }
        let econtext = (*s.estate).es_per_tuple_exprcontext;
        if !econtext.is_null() {
            pg_sys::MemoryContextReset((*econtext).ecxt_per_tuple_memory);
        }
    }
}

/// # Safety
/// `s` must be this transaction's open writer; `values` and `nulls` must be
/// audit.log's columns in table order.
unsafe fn write(s: &mut Sink, values: &[Datum], nulls: &[bool]) -> bool {
    // SAFETY: see insert(); every pointer belongs to this transaction's open writer.
    unsafe {
        // Everything below runs under the top transaction's owner, as open() does:
        // routing may open the partition, and index AMs may keep buffers pinned
        // between inserts (BRIN does since PostgreSQL 17) until close() releases them.
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
        let _guard = RestoreOwner(owner);
        let Some(leaf) = route(s, values, nulls) else { return false };
        let cid = pg_sys::GetCurrentCommandId(true);
        (*s.estate).es_output_cid = cid;
        pg_sys::table_tuple_insert((*leaf).ri_RelationDesc, s.slot, cid, 0, std::ptr::null_mut());
        insert_index_entries(s, leaf, s.slot);
        pg_sys::ExecClearTuple(s.slot);
        true
    }
}

enum Buffered {
    Kept,
    /// Kept, and the buffer is now full.
    Full,
    NotDirect,
}

/// # Safety
/// As [`write`].
unsafe fn buffer(s: &mut Sink, values: &[Datum], nulls: &[bool]) -> Buffered {
    // SAFETY: see write().
    unsafe {
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
        let guard = RestoreOwner(owner);
        let Some(leaf) = route(s, values, nulls) else {
            drop(guard);
            write_buffered(s);
            return Buffered::NotDirect;
        };
        // Marks the command id used, as an insert at once would, so that the next
        // CommandCounterIncrement starts a new command that sees the row.
        let cid = pg_sys::GetCurrentCommandId(true);
        if s.buffered > 0 && (s.buffered_leaf != leaf || s.buffered_cid != cid) {
            write_buffered(s);
        }
        if s.buffered == s.buffer.len() {
            // The slots live as long as the writer, in its executor memory.
            let old = pg_sys::MemoryContextSwitchTo((*s.estate).es_query_cxt);
            let b = pg_sys::MakeSingleTupleTableSlot(
                (*s.slot).tts_tupleDescriptor,
                &pg_sys::TTSOpsHeapTuple,
            );
            pg_sys::MemoryContextSwitchTo(old);
            s.buffer.push(b);
        }
        // The routing slot's values are copied into a heap tuple of the buffer slot's
        // own: the caller's datums may go once this returns.
        let b = s.buffer[s.buffered];
        pg_sys::ExecCopySlot(b, s.slot);
        pg_sys::ExecClearTuple(s.slot);
        // A heap-tuple slot, just filled: its tuple is the copy.
        let tuple = (*b.cast::<pg_sys::HeapTupleTableSlot>()).tuple;
        if !tuple.is_null() {
            s.buffered_bytes += (*tuple).t_len as usize;
        }
        s.buffered += 1;
        s.buffered_leaf = leaf;
        s.buffered_cid = cid;
        if s.buffered >= MULTI_INSERT_ROWS || s.buffered_bytes >= MULTI_INSERT_BYTES {
            Buffered::Full
        } else {
            Buffered::Kept
        }
    }
}

/// One multi-insert of the buffered rows, then their index entries in order.
///
/// # Safety
/// `s` must be this transaction's open writer.
unsafe fn write_buffered(s: &mut Sink) {
    if s.buffered == 0 {
        return;
    }
    // SAFETY: the buffer holds `buffered` stored rows for `buffered_leaf`, an open
    // result relation of this writer (see buffer()).
    unsafe {
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
        let _guard = RestoreOwner(owner);
        let leaf = s.buffered_leaf;
        let n = s.buffered;
        // Taken now: should an error interrupt the insert, nothing is written twice.
        s.buffered = 0;
        s.buffered_bytes = 0;
        let cid = s.buffered_cid;
        (*s.estate).es_output_cid = cid;
        #[cfg(any(test, feature = "pg_test"))]
        MULTI_INSERTS.with(|m| m.set(m.get() + 1));
        pg_sys::table_multi_insert(
            (*leaf).ri_RelationDesc,
            s.buffer.as_mut_ptr(),
            n as i32,
            cid,
            0,
            std::ptr::null_mut(),
        );
        for i in 0..n {
            insert_index_entries(s, leaf, s.buffer[i]);
            pg_sys::ExecClearTuple(s.buffer[i]);
        }
    }
}

/// Forgets the buffered rows (their subtransaction aborted).
///
/// # Safety
/// `s` must be this transaction's open writer.
unsafe fn discard(s: &mut Sink) {
    for i in 0..s.buffered {
        // SAFETY: a slot of this writer; clearing frees its tuple.
        unsafe { pg_sys::ExecClearTuple(s.buffer[i]) };
    }
    s.buffered = 0;
    s.buffered_bytes = 0;
}

struct RestoreOwner(pg_sys::ResourceOwner);

impl Drop for RestoreOwner {
    fn drop(&mut self) {
        // SAFETY: puts back the owner that was current before the switch.
        unsafe { pg_sys::CurrentResourceOwner = self.0 };
    }
}
