//! The executor and utility hooks that see reads of read-tracked tables.
//!
//! ExecutorStart finds the tracked tables a statement reads (from its
//! permission info, before PostgreSQL checks it, so a denied read is seen too)
//! and prepares one record per table while the transaction is sound. Run adds
//! up the rows; End queues the records with outcome `ok`. A statement that
//! fails never reaches End: the (sub)transaction abort that follows every ERROR
//! queues its records with the SQLSTATE that emit_log_hook saw reported, so a
//! reader cannot hide a read by failing or rolling back. COPY of a table to a file or client goes through
//! the utility hook, since it bypasses the executor.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void, CStr, CString};

use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgList;

use super::record::{Kind, Outcome, Record, NTEXT};
use super::{enqueue, targets};
use crate::quiet;
use crate::raw_hooks::{
    raw_standard_executor_end, raw_standard_executor_finish, raw_standard_executor_run,
    raw_standard_executor_start, raw_standard_process_utility,
};

static mut PREV_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_RUN: pg_sys::ExecutorRun_hook_type = None;
static mut PREV_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static mut PREV_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Records prepared for one running statement.
struct Pending {
    /// The executor's QueryDesc (null for a COPY of a table).
    qd: *mut pg_sys::QueryDesc,
    subxact: pg_sys::SubTransactionId,
    records: Vec<Box<Record>>,
    rows: u64,
    /// Set when the statement failed: the SQLSTATE (packed).
    failed: Option<i32>,
}

thread_local! {
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
    /// The COPY statements running (each by the subtransaction it started in):
    /// inside `COPY (query) TO`, the executor's records say COPY. A COPY that
    /// fails never reaches its end, so an aborting subtransaction drops the
    /// COPYs it started: a caught error must not leave later statements labeled COPY.
    static IN_COPY: RefCell<Vec<pg_sys::SubTransactionId>> = const { RefCell::new(Vec::new()) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Installs the hooks (from _PG_init, when preloaded).
pub fn install() {
    // SAFETY: _PG_init runs once per process before any query; hooks are chained.
    unsafe {
        PREV_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
        PREV_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        PREV_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        PREV_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log);
    }
}

fn ensure_callbacks() {
    if !REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: static callbacks, registered once per backend.
        unsafe {
            pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
        }
    }
}

/// Only client backends are audited: the worker, parallel workers (their leader
/// is) and other background processes are not.
fn audited_process() -> bool {
    // SAFETY: a plain read of this process's type.
    unsafe { pg_sys::MyBackendType == pg_sys::BackendType::B_BACKEND }
}

// ---- finding the reads --------------------------------------------------------------------

/// One read-tracked relation a statement reads: the tracked table it belongs to,
/// the role whose rights are checked, and the columns it reads (0: every column).
struct Read {
    target: std::rc::Rc<targets::Target>,
    check_as: Oid,
    columns: Vec<i32>,
}

/// Column numbers of a permission bitmap (offset as PostgreSQL stores them);
/// a whole-row reference (0) reads every column.
///
/// # Safety
/// `set` must be null or a valid Bitmapset.
unsafe fn columns_of(set: *const pg_sys::Bitmapset) -> Vec<i32> {
    let mut v = Vec::new();
    let mut m = -1;
    loop {
        // SAFETY: bms_next_member accepts null and any valid set.
        m = unsafe { pg_sys::bms_next_member(set, m) };
        if m < 0 {
            return v;
        }
        v.push(m + pg_sys::FirstLowInvalidHeapAttributeNumber);
    }
}

/// The read-tracked relations `pstmt` reads (SELECT privilege required), as the
/// permission check sees them. A statement that reads none costs a cache lookup
/// per relation and nothing else: no column list is made for it.
///
/// # Safety
/// `pstmt` must be a valid PlannedStmt.
unsafe fn reads_of(pstmt: *mut pg_sys::PlannedStmt) -> Vec<Read> {
    let mut out = Vec::new();
    let select = pg_sys::ACL_SELECT as pg_sys::AclMode;
    // SAFETY: the plan's lists hold the node types named (caller's contract).
    unsafe {
        #[cfg(feature = "pg15")]
        {
            let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*pstmt).rtable);
            for rte in rtable.iter_ptr() {
                if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION
                    && (*rte).requiredPerms & select != 0
                {
                    if let Some(target) = targets::lookup((*rte).relid) {
                        out.push(Read {
                            target,
                            check_as: (*rte).checkAsUser,
                            columns: columns_of((*rte).selectedCols),
                        });
                    }
                }
            }
        }
        #[cfg(not(feature = "pg15"))]
        {
            let perms = PgList::<pg_sys::RTEPermissionInfo>::from_pg((*pstmt).permInfos);
            for p in perms.iter_ptr() {
                if (*p).requiredPerms & select != 0 {
                    if let Some(target) = targets::lookup((*p).relid) {
                        out.push(Read {
                            target,
                            check_as: (*p).checkAsUser,
                            columns: columns_of((*p).selectedCols),
                        });
                    }
                }
            }
        }
    }
    out
}

/// The statement's query id: a u64 before PostgreSQL 18, an i64 since.
///
/// # Safety
/// `pstmt` must be a valid PlannedStmt.
#[allow(clippy::unnecessary_cast)]
unsafe fn query_id(pstmt: *mut pg_sys::PlannedStmt) -> i64 {
    // SAFETY: the caller's contract.
    unsafe { (*pstmt).queryId as i64 }
}

fn command_of(op: pg_sys::CmdType::Type) -> &'static str {
    if in_copy() {
        return "COPY";
    }
    match op {
        pg_sys::CmdType::CMD_SELECT => "SELECT",
        pg_sys::CmdType::CMD_UPDATE => "UPDATE",
        pg_sys::CmdType::CMD_INSERT => "INSERT",
        pg_sys::CmdType::CMD_DELETE => "DELETE",
        pg_sys::CmdType::CMD_MERGE => "MERGE",
        _ => "OTHER",
    }
}

/// A role's name (empty if it is gone).
fn role_name(role: Oid) -> Vec<u8> {
    // SAFETY: a syscache lookup; noerr returns NULL for an unknown role.
    unsafe {
        let p = pg_sys::GetUserNameFromId(role, true);
        if p.is_null() {
            Vec::new()
        } else {
            CStr::from_ptr(p).to_bytes().to_vec()
        }
    }
}

/// The longest prefix of `b`, at most `n` bytes, that ends on a character boundary
/// in the database encoding.
fn clip(b: &[u8], n: usize) -> usize {
    if n >= b.len() {
        return b.len();
    }
    // SAFETY: pg_mbcliplen reads at most `len` bytes of the buffer.
    unsafe { pg_sys::pg_mbcliplen(b.as_ptr().cast::<c_char>(), b.len() as i32, n as i32) as usize }
}

/// Prepares the records of one statement: one per tracked table it reads.
fn prepare(
    reads: Vec<Read>,
    command: &str,
    statement: &[u8],
    query_id: i64,
    parameters: impl FnOnce() -> Vec<u8>,
) -> Option<Vec<Box<Record>>> {
    let mut targets_read: Vec<(std::rc::Rc<targets::Target>, Oid, Vec<i32>)> = Vec::new();
    for r in reads {
        // Partitions read through their parent are one read of the parent.
        match targets_read.iter_mut().find(|f| f.0.named == r.target.named) {
            Some(f) => f.2.extend(r.columns),
            None => targets_read.push((r.target, r.check_as, r.columns)),
        }
    }
    if targets_read.is_empty() {
        return None;
    }
    // Learnt now, in a sound transaction: the records may be queued while it aborts.
    crate::settings::serves_this_database();
    let info = crate::capture::actor::current_for_ddl().ok()?;
    let parameters = parameters();
    // SAFETY: plain reads of this backend's session and transaction state.
    let (db, pid, at, txid, user) = unsafe {
        (
            pg_sys::MyDatabaseId,
            pg_sys::MyProcPid,
            pg_sys::GetCurrentStatementStartTimestamp(),
            u64::from(u32::from(pg_sys::GetTopTransactionIdIfAny())),
            pg_sys::GetUserId(),
        )
    };
    let mut out = Vec::with_capacity(targets_read.len());
    for (t, check_as, columns) in targets_read {
        let mut rec = Record::new(Kind::Read);
        rec.h.db = db;
        rec.h.relid = t.named;
        rec.h.pid = pid;
        rec.h.accessed_at = at;
        rec.h.txid = txid;
        rec.h.query_id = query_id;
        // A whole-row reference (0) reads every column: leave the list to the worker.
        rec.h.has_columns = !columns.contains(&0);
        for c in columns {
            rec.set_column(c);
        }
        let role = role_name(if check_as != pg_sys::InvalidOid { check_as } else { user });
        let fields: [&[u8]; NTEXT] = [
            t.schema.to_bytes(),
            t.table.to_bytes(),
            command.as_bytes(),
            &info.changed_by,
            info.db_user(),
            &role,
            info.text(),
            statement,
            &parameters,
        ];
        rec.set_texts(fields, clip);
        out.push(rec);
    }
    Some(out)
}

/// A read made by one of audit_ext's reading functions (state_at, table_at,
/// history) on the caller's behalf: what they return is the table's data, so it
/// is recorded like a SELECT of the table, under the function's name.
pub fn note_function_read(relid: Oid, function: &str, rows: i64) {
    // These functions are parallel safe: a parallel worker's call is a read too.
    // SAFETY: a plain read of this process's worker number.
    let parallel_worker = unsafe { pg_sys::ParallelWorkerNumber } >= 0;
    if !super::preloaded() || !(audited_process() || parallel_worker) {
        return;
    }
    // SAFETY: reads this backend's current role and the top-level statement's text.
    let (user, text) = unsafe {
        let q = pg_sys::debug_query_string;
        (pg_sys::GetUserId(), if q.is_null() { &[][..] } else { CStr::from_ptr(q).to_bytes() })
    };
    let Some(target) = targets::lookup(relid) else { return };
    let reads = vec![Read { target, check_as: user, columns: vec![0] }];
    if let Some(records) = prepare(reads, function, text, 0, Vec::new) {
        for mut rec in records {
            rec.h.rows = rows;
            enqueue(&rec, true);
        }
    }
}

/// The statement's parameters as a jsonb array's text (each value its type's text
/// output, cut to audit.access_parameter_max_size bytes), when
/// audit.access_parameters is on; empty otherwise. Parameters that PL/pgSQL
/// supplies lazily (through a fetch hook) are not read.
fn parameters_json(params: pg_sys::ParamListInfo) -> Vec<u8> {
    if params.is_null() || !crate::settings::ACCESS_PARAMETERS.get() {
        return Vec::new();
    }
    let max = crate::settings::ACCESS_PARAMETER_MAX_SIZE.get().max(0) as usize;
    // SAFETY: a valid ParamListInfo of the running statement: numParams entries follow it.
    unsafe {
        if (*params).paramFetch.is_some() {
            return Vec::new();
        }
        let n = (*params).numParams.max(0) as usize;
        let items: Vec<(pg_sys::Datum, bool, Oid)> = (0..n)
            .map(|i| {
                let p = &*(*params).params.as_ptr().add(i);
                if p.isnull || p.ptype == pg_sys::InvalidOid {
                    return (pg_sys::Datum::from(0), true, pg_sys::TEXTOID);
                }
                let mut text = crate::datum::output_bytes(p.value, p.ptype);
                if text.len() > max {
                    text.truncate(clip(&text, max));
                    text.extend_from_slice(b"...");
                }
                (crate::datum::text_datum(&text), false, pg_sys::TEXTOID)
            })
            .collect();
        let arr = crate::capture::encode::jsonb_array(&items);
        crate::chain::append::jsonb_text(arr).unwrap_or_default()
    }
}

// ---- the statement's life -----------------------------------------------------------------

fn begin(qd: *mut pg_sys::QueryDesc, records: Vec<Box<Record>>) {
    ensure_callbacks();
    // SAFETY: reads the current subtransaction id.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    PENDING.with(|p| p.borrow_mut().push(Pending { qd, subxact, records, rows: 0, failed: None }));
}

fn with_pending(qd: *mut pg_sys::QueryDesc, f: impl FnOnce(&mut Pending)) {
    PENDING.with(|p| {
        if let Some(e) = p.borrow_mut().iter_mut().rev().find(|e| e.qd == qd) {
            f(e);
        }
    });
}

/// Queues the statement's records: `ok`, or the error it failed with.
fn finish(qd: *mut pg_sys::QueryDesc, may_raise: bool) {
    let done = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let i = p.iter().rposition(|e| e.qd == qd)?;
        Some(p.remove(i))
    });
    if let Some(p) = done {
        queue_all(p, may_raise);
    }
}

fn queue_all(p: Pending, may_raise: bool) {
    let denied = PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32;
    for mut rec in p.records {
        rec.h.rows = p.rows as i64;
        match p.failed {
            None => rec.h.outcome = Outcome::Ok,
            Some(code) => {
                // 0: the error's SQLSTATE was not seen (the record says error, without one).
                rec.h.outcome = if code == denied { Outcome::Denied } else { Outcome::Error };
                rec.h.sqlstate = code;
                if code == denied {
                    rec.h.rows = 0;
                }
            }
        }
        enqueue(&rec, may_raise);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT) {
        IN_COPY.with(|c| c.borrow_mut().clear());
        let code = LAST_ERROR.with(|e| e.take());
        let all = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
        for mut p in all {
            p.failed = Some(code.unwrap_or(0));
            queue_all(p, false);
        }
    } else if matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE) {
        LAST_ERROR.with(|e| e.set(None));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        IN_COPY.with(|c| c.borrow_mut().retain(|&s| s < my_subid));
        let gone: Vec<Pending> = PENDING.with(|p| {
            let mut p = p.borrow_mut();
            let (gone, kept) =
                std::mem::take(&mut *p).into_iter().partition(|e| e.subxact >= my_subid);
            *p = kept;
            gone
        });
        // An error caught inside the statement (PL/pgSQL EXCEPTION) was never
        // reported, so its SQLSTATE is unknown here unless emit_log_hook saw it.
        let code = LAST_ERROR.with(|e| e.take());
        for mut p in gone {
            p.failed = Some(code.unwrap_or(0));
            queue_all(p, false);
        }
    }
}

// ---- the hooks ----------------------------------------------------------------------------
//
// Each hook is a plain frame around a call of the previous hook (or PostgreSQL's
// standard function, crate::raw_hooks says why unguarded); the Rust work happens
// before and after, in guarded helpers.

static mut PREV_EMIT_LOG: pg_sys::emit_log_hook_type = None;

thread_local! {
    /// The SQLSTATE of the last ERROR this backend reported, for the abort that follows.
    static LAST_ERROR: Cell<Option<i32>> = const { Cell::new(None) };
}

/// Notes each reported ERROR's SQLSTATE: the (sub)transaction abort that follows
/// stamps it on the records of the statements it ended.
#[pg_guard]
unsafe extern "C-unwind" fn emit_log(edata: *mut pg_sys::ErrorData) {
    // SAFETY: PostgreSQL passes the error being reported.
    unsafe {
        if !edata.is_null() && (*edata).elevel >= PgLogLevel::ERROR as i32 {
            LAST_ERROR.with(|e| e.set(Some((*edata).sqlerrcode)));
        }
        if let Some(prev) = PREV_EMIT_LOG {
            prev(edata);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn before_start(qd: *mut pg_sys::QueryDesc, eflags: i32) {
    let explain_only = eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 != 0;
    if explain_only || !audited_process() || quiet::active() {
        return;
    }
    // SAFETY: the executor hands us a valid QueryDesc with its plan and text.
    let found = unsafe {
        let pstmt = (*qd).plannedstmt;
        let reads = reads_of(pstmt);
        if reads.is_empty() {
            return;
        }
        let text = if (*qd).sourceText.is_null() {
            &[][..]
        } else {
            CStr::from_ptr((*qd).sourceText).to_bytes()
        };
        let params = (*qd).params;
        prepare(reads, command_of((*qd).operation), text, query_id(pstmt), || {
            parameters_json(params)
        })
    };
    if let Some(records) = found {
        begin(qd, records);
    }
}

unsafe extern "C-unwind" fn executor_start(qd: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: a guarded helper, then the previous hook or the standard function
    // with the executor's own arguments (see the section's comment).
    unsafe {
        before_start(qd, eflags);
        match PREV_START {
            Some(prev) => prev(qd, eflags),
            None => raw_standard_executor_start(qd, eflags),
        }
    }
}

/// Adds what this run processed to the statement's rows.
#[pg_guard]
unsafe extern "C-unwind" fn after_run(qd: *mut pg_sys::QueryDesc) {
    // SAFETY: a started QueryDesc has its EState.
    let n = unsafe {
        if (*qd).estate.is_null() {
            0
        } else {
            (*(*qd).estate).es_processed
        }
    };
    with_pending(qd, |p| p.rows += n);
}

#[cfg(not(feature = "pg18"))]
unsafe extern "C-unwind" fn executor_run(
    qd: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    // SAFETY: as executor_start.
    unsafe {
        match PREV_RUN {
            Some(prev) => prev(qd, direction, count, execute_once),
            None => raw_standard_executor_run(qd, direction, count, execute_once),
        }
        after_run(qd);
    }
}

#[cfg(feature = "pg18")]
unsafe extern "C-unwind" fn executor_run(
    qd: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
) {
    // SAFETY: as executor_start.
    unsafe {
        match PREV_RUN {
            Some(prev) => prev(qd, direction, count),
            None => raw_standard_executor_run(qd, direction, count),
        }
        after_run(qd);
    }
}

unsafe extern "C-unwind" fn executor_finish(qd: *mut pg_sys::QueryDesc) {
    // SAFETY: as executor_start.
    unsafe {
        match PREV_FINISH {
            Some(prev) => prev(qd),
            None => raw_standard_executor_finish(qd),
        }
    }
}

/// Queues the statement's records once it has ended well.
#[pg_guard]
unsafe extern "C-unwind" fn after_end(qd: *mut pg_sys::QueryDesc) {
    // During an abort (a cursor closed by ROLLBACK) the policy `error` cannot fail anything.
    // SAFETY: a plain read of transaction state.
    let may_raise = unsafe { pg_sys::IsTransactionState() };
    finish(qd, may_raise);
}

unsafe extern "C-unwind" fn executor_end(qd: *mut pg_sys::QueryDesc) {
    // SAFETY: as executor_start.
    unsafe {
        match PREV_END {
            Some(prev) => prev(qd),
            None => raw_standard_executor_end(qd),
        }
        after_end(qd);
    }
}

/// The relation a `COPY … TO` of a table reads, and its column list (None: all).
///
/// # Safety
/// `stmt` must be a valid utility statement node.
unsafe fn copy_to_table(stmt: *mut pg_sys::Node) -> Option<(Oid, Option<Vec<CString>>)> {
    // SAFETY: the node tag is checked before the cast; the RangeVar is looked up
    // without a lock and without an error for a missing table (COPY reports that).
    unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_CopyStmt {
            return None;
        }
        let copy = stmt.cast::<pg_sys::CopyStmt>();
        if (*copy).is_from || (*copy).relation.is_null() {
            return None;
        }
        let relid = pg_sys::RangeVarGetRelidExtended(
            (*copy).relation,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        if relid == pg_sys::InvalidOid {
            return None;
        }
        let cols = if (*copy).attlist.is_null() {
            None
        } else {
            let list = PgList::<pg_sys::String>::from_pg((*copy).attlist);
            Some(
                list.iter_ptr()
                    // The name's bytes as they are: in a database that is not
                    // UTF-8, a lossy copy would name no column at all.
                    .map(|s| CStr::from_ptr((*s).sval).to_owned())
                    .collect(),
            )
        };
        Some((relid, cols))
    }
}

/// Before a utility statement: a COPY of a read-tracked table to a file or
/// client prepares its records (keyed by the statement node: it has no
/// QueryDesc). Returns whether the statement is a COPY.
#[pg_guard]
unsafe extern "C-unwind" fn before_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const c_char,
) -> bool {
    // SAFETY: the utility statement of a valid PlannedStmt.
    let stmt = unsafe { (*pstmt).utilityStmt };
    // SAFETY: a node of the plan.
    let is_copy = unsafe { !stmt.is_null() && (*stmt).type_ == pg_sys::NodeTag::T_CopyStmt };
    if is_copy && audited_process() && !quiet::active() {
        // SAFETY: stmt is the statement being run.
        let copied = unsafe { copy_to_table(stmt) };
        if let Some((relid, cols, target)) =
            copied.and_then(|(relid, cols)| Some((relid, cols, targets::lookup(relid)?)))
        {
            let columns = cols.map(|c| attnums(relid, &c)).unwrap_or_else(|| vec![0]);
            // SAFETY: reads this backend's current role, the statement text and the query id.
            let (user, text, qid) = unsafe {
                (
                    pg_sys::GetUserId(),
                    if query.is_null() { &[][..] } else { CStr::from_ptr(query).to_bytes() },
                    query_id(pstmt),
                )
            };
            let reads = vec![Read { target, check_as: user, columns }];
            if let Some(records) = prepare(reads, "COPY", text, qid, Vec::new) {
                begin(stmt.cast(), records);
            }
        }
    }
    if is_copy {
        ensure_callbacks();
        // SAFETY: reads the current subtransaction id.
        let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
        IN_COPY.with(|c| c.borrow_mut().push(subxact));
    }
    is_copy
}

/// After a utility statement that ended well: a COPY's records get its row count.
#[pg_guard]
unsafe extern "C-unwind" fn after_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    qc: *mut pg_sys::QueryCompletion,
) {
    IN_COPY.with(|c| c.borrow_mut().pop());
    // SAFETY: the statement that just ran, and its completion tag.
    let (key, n) = unsafe {
        (
            (*pstmt).utilityStmt.cast::<pg_sys::QueryDesc>(),
            if qc.is_null() { 0 } else { (*qc).nprocessed },
        )
    };
    with_pending(key, |p| p.rows = n);
    finish(key, true);
}

fn in_copy() -> bool {
    IN_COPY.with(|c| !c.borrow().is_empty())
}

#[allow(clippy::too_many_arguments)] // PostgreSQL's hook signature
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: as executor_start, with PostgreSQL's utility arguments.
    unsafe {
        let is_copy = before_utility(pstmt, query);
        match PREV_UTILITY {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => raw_standard_process_utility(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                env,
                dest,
                qc,
            ),
        }
        if is_copy {
            after_utility(pstmt, qc);
        }
    }
}

/// The column numbers of `names` in `relid` (unknown names are COPY's to refuse).
fn attnums(relid: Oid, names: &[CString]) -> Vec<i32> {
    names
        .iter()
        .filter_map(|n| {
            // SAFETY: a syscache lookup by name.
            let a = unsafe { pg_sys::get_attnum(relid, n.as_ptr()) };
            (a > 0).then_some(a as i32)
        })
        .collect()
}
