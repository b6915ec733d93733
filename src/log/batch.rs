//! Statement-batched audit rows: the capture trigger's rows of one statement are
//! kept in the sink (log::sink::insert_buffered) and written in multi-inserts
//! of up to MULTI_INSERT_ROWS rows, as COPY writes, instead of one heap and one
//! index insert each.
//!
//! A statement's AFTER ROW triggers fire at its end: inside
//! standard_ExecutorFinish (AfterTriggerEndQuery), or inside a utility
//! statement that fires them itself (COPY FROM). The hooks here wrap both in a
//! [`Frame`], and the rows kept in a frame are written when it ends, in the
//! statement's own subtransaction, before anything that follows the statement
//! can look at audit.log.
//!
//! Rows may be kept only while nothing but audit_ext itself can look at the log
//! before the flush, so that every reader sees exactly what it saw when every
//! row was written at once:
//!
//! - Only inside a frame. A trigger that fires outside one (the library was
//!   loaded by this very statement, so its hooks missed its start; deferred
//!   triggers at commit; a logical replication apply worker) writes at once.
//! - Only while the statement fires no trigger but audit_ext's own and
//!   foreign-key checks (which only read user tables), and the tracked table's
//!   columns are of built-in types (a user type's cast to json is user code).
//!   Any other trigger, a constraint trigger, or a foreign-key action (whose
//!   cascaded rows fire their triggers at this statement's level) could run
//!   SQL, or start a subtransaction, between two of our rows: for such
//!   statements every row is written at once, as before.
//! - A statement that starts while rows are kept (a foreign-key check's query,
//!   or SQL that audit_ext itself runs while capturing) writes them first, in
//!   ExecutorStart. That is sound only because the sink writes each row with
//!   the command id that was current when the row was kept: the new statement's
//!   snapshot, taken after the command counter moved on, sees them, exactly as
//!   it would have seen them written at once. Rows written with the new
//!   statement's command id would be invisible to it.
//! - Every reader of the log runs SQL, so reaches ExecutorStart; seal() and
//!   verify() also flush explicitly, for the statement they run in.
//! - A (sub)transaction that ends writes its own rows (sink: PRE_COMMIT_SUB,
//!   PRE_COMMIT) or forgets them (ABORT_SUB, abort): an ERROR part-way through
//!   a statement leaves no half batch. A frame ended by an ERROR is dropped at
//!   the abort that follows.
//!
//! The hooks are installed by _PG_init whether or not the library is preloaded:
//! they cost a frame push per statement, and without them no row is ever kept.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void};

use crate::raw_hooks::{
    raw_standard_executor_finish, raw_standard_executor_start, raw_standard_process_utility,
};
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgList;

static mut PREV_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// One statement whose AFTER ROW triggers may fire inside it.
struct Frame {
    id: u64,
    subxact: pg_sys::SubTransactionId,
    /// The executor's statement; null for a utility statement.
    qd: *mut pg_sys::QueryDesc,
    /// A COPY FROM: fires the AFTER ROW triggers of its table itself.
    copy_from: bool,
    /// Whether rows may be kept in this frame; decided at its first audit row.
    keep: Option<bool>,
    /// Tables whose rows this frame captured: whether they qualify.
    tables: Vec<(Oid, bool)>,
}

thread_local! {
    static FRAMES: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
    static NEXT_ID: Cell<u64> = const { Cell::new(1) };
    /// Set when a captured row was kept: the sink may hold rows to flush.
    static KEPT: Cell<bool> = const { Cell::new(false) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Installs the hooks; from _PG_init, after crate::access's, so that these run
/// first: access auditing's ExecutorStart may start a subtransaction (a target
/// lookup), and kept rows are written before it.
pub fn install() {
    // SAFETY: _PG_init runs once per process, before this library's code runs a
    // query; hooks are chained to whatever was installed before.
    unsafe {
        PREV_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
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

/// Frames of statements that an ERROR ended are dropped by the abort that follows
/// (the sink drops their kept rows). A procedure's CALL frame may see its
/// transaction end under it: it only loses its flush, which its statements did.
#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT) {
        FRAMES.with(|f| f.borrow_mut().clear());
        KEPT.with(|k| k.set(false));
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
        FRAMES.with(|f| f.borrow_mut().retain(|f| f.subxact < my_subid));
    }
}

fn push(qd: *mut pg_sys::QueryDesc, copy_from: bool) -> u64 {
    ensure_callbacks();
    let id = NEXT_ID.with(|n| n.replace(n.get() + 1));
    // SAFETY: a plain read of the current subtransaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    FRAMES.with(|f| {
        f.borrow_mut().push(Frame { id, subxact, qd, copy_from, keep: None, tables: Vec::new() })
    });
    id
}

/// Writes the kept rows, if any, unless the transaction is aborting (the abort
/// forgets them).
fn flush() {
    // SAFETY: a plain read of transaction state.
    if KEPT.with(|k| k.get()) && unsafe { pg_sys::IsTransactionState() } {
        crate::log::sink::flush();
        KEPT.with(|k| k.set(crate::log::sink::buffered() > 0));
    }
}

/// Writes the rows kept so far by this (sub)transaction: for code of audit_ext
/// that reads audit.log itself, such as seal() and verify().
pub fn flush_before_read() {
    flush();
}

/// A statement ends: its kept rows are written, then its frame goes.
#[pg_guard]
unsafe extern "C-unwind" fn pop(id: u64) {
    flush();
    FRAMES.with(|f| {
        let mut f = f.borrow_mut();
        if let Some(i) = f.iter().rposition(|f| f.id == id) {
            f.truncate(i);
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn before_start() {
    flush();
}

#[pg_guard]
unsafe extern "C-unwind" fn before_finish(qd: *mut pg_sys::QueryDesc) -> u64 {
    push(qd, false)
}

/// Flushes (a utility statement inside a statement's trigger is a statement
/// too), then opens the frame: a COPY FROM fires its own AFTER ROW triggers.
#[pg_guard]
unsafe extern "C-unwind" fn before_utility(pstmt: *mut pg_sys::PlannedStmt) -> u64 {
    flush();
    // SAFETY: the utility statement of a valid PlannedStmt; node tags are checked
    // before the casts.
    let (copy_from, leaves_log_open) = unsafe {
        let stmt = (*pstmt).utilityStmt;
        let tag = if stmt.is_null() { None } else { Some((*stmt).type_) };
        (
            tag == Some(pg_sys::NodeTag::T_CopyStmt) && (*stmt.cast::<pg_sys::CopyStmt>()).is_from,
            tag.is_some_and(leaves_log_open),
        )
    };
    if !leaves_log_open {
        // SAFETY: a plain read of transaction state.
        if unsafe { pg_sys::IsTransactionState() } {
            crate::log::sink::close_between_statements();
        }
    }
    push(std::ptr::null_mut(), copy_from)
}

/// Utility statements that never need a relation closed: the log writer stays
/// open across them, as it does across DML, so that a transaction of savepoints,
/// SETs and statements does not reopen it each time. Every other utility
/// statement (any DDL: TRUNCATE, ALTER TABLE, CREATE INDEX, DROP, CLUSTER, ...)
/// may be aimed at audit.log or its partitions, which PostgreSQL refuses while
/// this session holds them open; the writer is closed before it
/// (log::sink::close_between_statements). DDL is rare enough that reopening the
/// writer after it costs nothing worth measuring.
fn leaves_log_open(tag: pg_sys::NodeTag) -> bool {
    use pg_sys::NodeTag::*;
    matches!(
        tag,
        T_TransactionStmt
            | T_VariableSetStmt
            | T_VariableShowStmt
            | T_ConstraintsSetStmt
            | T_DeclareCursorStmt
            | T_FetchStmt
            | T_ClosePortalStmt
            | T_PrepareStmt
            | T_ExecuteStmt
            | T_DeallocateStmt
            | T_CopyStmt
            | T_ExplainStmt
            | T_CallStmt
            | T_DoStmt
            | T_LockStmt
            | T_NotifyStmt
            | T_ListenStmt
            | T_UnlistenStmt
            | T_DiscardStmt
            | T_CheckPointStmt
            | T_LoadStmt
    )
}

// The hooks are plain frames around the previous hook or PostgreSQL's standard
// function (crate::raw_hooks): an ERROR below passes through them as through C.
// The Rust work is in the guarded helpers above. A frame that an ERROR skips is
// dropped at the abort.

unsafe extern "C-unwind" fn executor_start(qd: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: a guarded helper, then the previous hook or the standard function with
    // the executor's own arguments.
    unsafe {
        before_start();
        match PREV_START {
            Some(prev) => prev(qd, eflags),
            None => raw_standard_executor_start(qd, eflags),
        }
    }
}

unsafe extern "C-unwind" fn executor_finish(qd: *mut pg_sys::QueryDesc) {
    // SAFETY: as executor_start.
    unsafe {
        let id = before_finish(qd);
        match PREV_FINISH {
            Some(prev) => prev(qd),
            None => raw_standard_executor_finish(qd),
        }
        pop(id);
    }
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
        let id = before_utility(pstmt);
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
        pop(id);
    }
}

// ---- whether a captured row may be kept ---------------------------------------------------

/// Foreign-key checks: they only read user tables (no SQL of the user's, no
/// subtransaction, no rows of their own). Actions (cascade, set null, set
/// default) are not here: the rows they change fire triggers at our level.
const FK_CHECKS: [u32; 6] = [
    pg_sys::F_RI_FKEY_CHECK_INS,
    pg_sys::F_RI_FKEY_CHECK_UPD,
    pg_sys::F_RI_FKEY_NOACTION_DEL,
    pg_sys::F_RI_FKEY_NOACTION_UPD,
    pg_sys::F_RI_FKEY_RESTRICT_DEL,
    pg_sys::F_RI_FKEY_RESTRICT_UPD,
];

/// Whether rows of `rel` may be kept: every trigger on it is audit_ext's own
/// (`capture`, the trigger function's oid) or a foreign-key check, and every
/// column is of a built-in type (or a domain over one), whose jsonb conversion
/// runs no user code.
///
/// # Safety
/// `rel` must be an open relation; `trigdesc` null or its trigger descriptor.
unsafe fn qualifies(
    rel: pg_sys::Relation,
    trigdesc: *mut pg_sys::TriggerDesc,
    capture: Oid,
) -> bool {
    // SAFETY: the caller's contract; the descriptor holds numtriggers entries.
    unsafe {
        if !trigdesc.is_null() {
            for i in 0..(*trigdesc).numtriggers.max(0) as usize {
                let f = (*(*trigdesc).triggers.add(i)).tgfoid;
                if f != capture && !FK_CHECKS.contains(&f.to_u32()) {
                    return false;
                }
            }
        }
        let att = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        att.iter().all(|a| {
            a.attisdropped
                || a.atttypid.to_u32() < pg_sys::FirstNormalObjectId
                || pg_sys::getBaseType(a.atttypid).to_u32() < pg_sys::FirstNormalObjectId
        })
    }
}

/// Whether every table the statement writes qualifies: their rows' triggers are
/// all that fire in its frame.
///
/// # Safety
/// `qd` must be a QueryDesc inside its ExecutorFinish.
unsafe fn statement_qualifies(qd: *mut pg_sys::QueryDesc, capture: Oid) -> bool {
    // SAFETY: a started statement's EState and its lists of open result relations.
    unsafe {
        let estate = (*qd).estate;
        if estate.is_null() {
            return false;
        }
        for list in
            [(*estate).es_opened_result_relations, (*estate).es_tuple_routing_result_relations]
        {
            for rri in PgList::<pg_sys::ResultRelInfo>::from_pg(list).iter_ptr() {
                if !qualifies((*rri).ri_RelationDesc, (*rri).ri_TrigDesc, capture) {
                    return false;
                }
            }
        }
        true
    }
}

/// Whether the row the capture trigger is writing for `rel` may be kept, to be
/// written with the statement's others (see the module's rules). `capture` is
/// the oid of the trigger's function.
///
/// # Safety
/// `rel` must be the trigger's relation, open.
pub unsafe fn may_keep(rel: pg_sys::Relation, capture: Oid) -> bool {
    // SAFETY: a plain read of the current subtransaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    // SAFETY: the relation is open (caller's contract).
    let relid = unsafe { (*rel).rd_id };
    let frame = FRAMES.with(|f| {
        f.borrow().last().map(|f| {
            let table = f.tables.iter().find(|t| t.0 == relid).map(|t| t.1);
            (f.subxact, f.qd, f.copy_from, f.keep, table)
        })
    });
    // No frame: no end of statement of ours will write kept rows.
    let Some((frame_subxact, qd, copy_from, keep, table)) = frame else { return false };
    // A subtransaction begun inside the statement, not by a statement of its own:
    // its rows would wait for the frame's end in another subtransaction.
    if frame_subxact != subxact || keep == Some(false) {
        return false;
    }
    let keep = match keep {
        Some(k) => k,
        // SAFETY: the frame's QueryDesc is in its ExecutorFinish while the frame exists.
        None if !qd.is_null() => unsafe { statement_qualifies(qd, capture) },
        None => copy_from,
    };
    let table_ok = match table {
        Some(ok) => ok,
        // SAFETY: the trigger's open relation and its own descriptor. A COPY into a
        // partitioned table fires the triggers of partitions we have not seen:
        // only a COPY into the table itself is known to fire no other trigger.
        None => unsafe {
            qualifies(rel, (*rel).trigdesc, capture)
                && !(copy_from && (*(*rel).rd_rel).relispartition)
        },
    };
    let keep = keep && table_ok;
    FRAMES.with(|f| {
        if let Some(f) = f.borrow_mut().last_mut() {
            // A table that does not qualify (for a statement, one its check did not
            // see: something else fires rows here) ends keeping for the whole frame.
            f.keep = Some(keep);
            if table.is_none() {
                f.tables.push((relid, table_ok));
            }
        }
    });
    if keep {
        KEPT.with(|k| k.set(true));
    }
    keep
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::log::sink::{multi_inserts, MULTI_INSERT_ROWS};

    /// More rows than one multi-insert takes.
    const ROWS: i64 = MULTI_INSERT_ROWS as i64 * 5 / 2;

    fn one(sql: &str) -> i64 {
        Spi::get_one::<i64>(sql).unwrap().unwrap_or(-1)
    }

    fn setup(table: &str) {
        Spi::run(&format!(
            "CREATE EXTENSION IF NOT EXISTS audit_ext;
             CREATE EXTENSION IF NOT EXISTS amcheck;
             CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
             SELECT audit.track('{table}');
             INSERT INTO {table} SELECT g, 0 FROM generate_series(1, {ROWS}) g;"
        ))
        .unwrap();
    }

    /// The rows of `table` and `op` (one statement over rows 1..n, in that order)
    /// have ids drawn one after the other in the order of the changes, and the
    /// log's btree indexes are sound.
    fn assert_in_order(table: &str, op: &str, expect: i64) {
        let (n, span, ordered) = Spi::get_three::<i64, i64, bool>(&format!(
            "SELECT count(*), max(id) - min(id) + 1, bool_and(ordered) FROM (
               SELECT id, COALESCE(row_id::int > lag(row_id::int) OVER (ORDER BY id), true) AS ordered
                 FROM audit.log WHERE table_name = '{table}' AND operation = '{op}') s"
        ))
        .unwrap();
        assert_eq!(n, Some(expect), "{op} rows of {table}");
        assert_eq!(span, Some(expect), "ids of one statement are consecutive");
        assert_eq!(ordered, Some(true), "ids follow the order of the changes");
        Spi::run(
            "SELECT bt_index_check(i.indexrelid) FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indrelid
              JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
             WHERE h.inhparent = 'audit.log'::regclass AND a.amname = 'btree'",
        )
        .unwrap();
    }

    /// (Not seal(): it waits for the other tests' open transactions, which hold
    /// audit ids until they roll back; tests/batch.rs seals beside writers.)
    fn assert_verifies() {
        let ok = Spi::get_one::<bool>("SELECT ok FROM audit.verify()").unwrap();
        assert_eq!(ok, Some(true));
    }

    #[pg_test]
    fn a_statement_of_several_batches_writes_every_row_in_order() {
        setup("several");
        let before = multi_inserts();
        Spi::run("UPDATE several SET v = v + 1").unwrap();
        let batches = multi_inserts() - before;
        // Written in multi-inserts, at most MULTI_INSERT_ROWS rows each.
        assert!(batches >= 3, "{batches} multi-inserts for {ROWS} rows");
        assert_in_order("several", "UPDATE", ROWS);
        assert_in_order("several", "INSERT", ROWS);
        assert_verifies();
    }

    #[pg_test]
    fn a_rolled_back_savepoint_leaves_none_of_its_rows() {
        setup("saved");
        Spi::run(
            "DO $$ DECLARE n bigint; BEGIN
               UPDATE saved SET v = v + 1;
               BEGIN
                 -- Inside the savepoint, the statement before it is all there.
                 SELECT count(*) INTO n FROM audit.log WHERE table_name = 'saved' AND operation = 'UPDATE';
                 UPDATE saved SET v = v + 10;
                 UPDATE saved SET v = v + 10 WHERE id <= 10;
                 RAISE EXCEPTION '%', n;
               EXCEPTION WHEN raise_exception THEN
                 PERFORM set_config('audit_test.inner', SQLERRM, true);
               END;
               UPDATE saved SET v = v + 100 WHERE id <= 1500;
             END $$",
        )
        .unwrap();
        let n = |v: i64| {
            one(&format!(
                "SELECT count(*) FROM audit.log WHERE table_name = 'saved' AND operation = 'UPDATE'
                    AND (new_values->>'v')::int = {v}"
            ))
        };
        let inner = Spi::get_one::<String>("SELECT current_setting('audit_test.inner', true)");
        assert_eq!(
            inner.unwrap(),
            Some(ROWS.to_string()),
            "the savepoint saw the statement before it"
        );
        assert_eq!(n(1), ROWS, "the outer statement's rows stay");
        assert_eq!(n(101), 1500, "the statement after the rollback is written");
        assert_eq!(n(11) + n(21), 0, "the rolled back statements leave nothing");
        assert_eq!(
            one("SELECT count(*) FROM audit.log WHERE table_name = 'saved' AND operation = 'UPDATE'"),
            ROWS + 1500
        );
        assert_verifies();
    }

    /// Row 1500's new image cannot be made jsonb (json takes a \u0000 escape, jsonb
    /// does not), so the capture trigger fails after 1499 rows were captured: a
    /// full batch written and a half one kept. Neither may remain.
    #[pg_test]
    fn an_error_half_way_through_a_statement_leaves_no_half_batch() {
        Spi::run(&format!(
            "CREATE EXTENSION IF NOT EXISTS audit_ext;
             CREATE EXTENSION IF NOT EXISTS amcheck;
             CREATE TABLE halfway (id int PRIMARY KEY, v int NOT NULL, j json NOT NULL);
             SELECT audit.track('halfway');
             INSERT INTO halfway SELECT g, 0, '{{}}' FROM generate_series(1, {ROWS}) g;"
        ))
        .unwrap();
        let before = multi_inserts();
        Spi::run(
            r#"DO $$ BEGIN
                 UPDATE halfway SET v = v + 1, j = CASE WHEN id = 1500 THEN '"\u0000"' ELSE j END;
               EXCEPTION WHEN others THEN
                 PERFORM set_config('audit_test.caught', SQLSTATE, true);
               END $$"#,
        )
        .unwrap();
        let caught = Spi::get_one::<String>("SELECT current_setting('audit_test.caught', true)");
        assert_eq!(caught.unwrap().as_deref(), Some("22P05"), "the capture of row 1500 failed");
        assert_eq!(multi_inserts() - before, 1, "the failed statement had written one batch");
        assert_eq!(
            one("SELECT count(*) FROM audit.log WHERE table_name = 'halfway' AND operation = 'UPDATE'"),
            0
        );
        // The writer goes on in the same transaction, its rows in order after the gap.
        Spi::run("UPDATE halfway SET v = v + 2").unwrap();
        assert_eq!(
            one("SELECT count(*) FROM audit.log WHERE table_name = 'halfway' AND operation = 'UPDATE'
                    AND (new_values->>'v')::int <> 2"),
            0
        );
        assert_in_order("halfway", "UPDATE", ROWS);
        assert_verifies();
    }

    /// The rule: a statement that fires a trigger of the user's (or a constraint
    /// trigger) writes its audit rows one at a time, as before, so the trigger
    /// sees every audit row written before it fired: in name order, audit_capture_row
    /// fires before zz_seen, so at the k-th row it sees the k-th row's own.
    #[pg_test]
    fn a_users_trigger_sees_what_it_saw_before() {
        setup("watched");
        // Its reads of audit.log are not this test's concern, and the paused worker
        // would let them fill the access queue.
        Spi::run("SET LOCAL audit.access_log_self = off").unwrap();
        Spi::run(
            "DELETE FROM watched WHERE id > 300;
             CREATE TABLE seen (n serial, id int, logged bigint);
             CREATE FUNCTION count_log() RETURNS trigger LANGUAGE plpgsql AS $$
             DECLARE c bigint;
             BEGIN
               -- In a subtransaction of its own: rows kept by the statement's
               -- subtransaction could not be written here.
               BEGIN
                 SELECT count(*) INTO c FROM audit.log WHERE table_name = 'watched';
               EXCEPTION WHEN others THEN c := -1;
               END;
               INSERT INTO seen (id, logged) VALUES (NEW.id, c);
               RETURN NULL;
             END $$;
             CREATE TRIGGER zz_seen AFTER UPDATE ON watched FOR EACH ROW EXECUTE FUNCTION count_log();",
        )
        .unwrap();
        // Before it: ROWS inserts and ROWS - 300 deletes.
        let base = 2 * ROWS - 300;
        Spi::run("UPDATE watched SET v = v + 1").unwrap();
        let wrong = one(&format!(
            "SELECT count(*) FROM (SELECT logged, {base} + row_number() OVER (ORDER BY n) AS expected FROM seen) s
              WHERE logged <> expected"
        ));
        assert_eq!(wrong, 0, "the trigger saw every audit row written before it");
        assert_eq!(one("SELECT count(*) FROM seen"), 300);

        // A constraint trigger fired later, at SET CONSTRAINTS, sees the whole statement.
        Spi::run(
            "DROP TRIGGER zz_seen ON watched; TRUNCATE seen;
             CREATE CONSTRAINT TRIGGER zz_later AFTER UPDATE ON watched DEFERRABLE INITIALLY DEFERRED
               FOR EACH ROW EXECUTE FUNCTION count_log();
             UPDATE watched SET v = v + 1;
             SET CONSTRAINTS ALL IMMEDIATE;",
        )
        .unwrap();
        assert_eq!(one("SELECT count(*) FROM seen"), 300);
        assert_eq!(one(&format!("SELECT count(*) FROM seen WHERE logged <> {}", base + 600)), 0);
        assert_verifies();
    }

    #[pg_test]
    fn later_statements_of_a_function_see_earlier_ones_rows() {
        setup("stepped");
        Spi::run(
            "CREATE FUNCTION steps() RETURNS bigint[] LANGUAGE plpgsql AS $$
             DECLARE a bigint; b bigint; c bigint;
             BEGIN
               UPDATE stepped SET v = v + 1;
               SELECT count(*) INTO a FROM audit.log WHERE table_name = 'stepped' AND operation = 'UPDATE';
               UPDATE stepped SET v = v + 1;
               SELECT count(*) INTO b FROM audit.log WHERE table_name = 'stepped' AND operation = 'UPDATE';
               UPDATE stepped SET v = v + 1 WHERE id <= 10;
               SELECT count(*) INTO c FROM audit.log WHERE table_name = 'stepped' AND operation = 'UPDATE';
               RETURN ARRAY[a, b, c];
             END $$;",
        )
        .unwrap();
        let before = multi_inserts();
        let seen = Spi::get_one::<Vec<i64>>("SELECT steps()").unwrap();
        assert_eq!(seen, Some(vec![ROWS, 2 * ROWS, 2 * ROWS + 10]));
        assert!(multi_inserts() - before >= 6, "the function's statements were batched");
        assert_verifies();
    }

    #[pg_test]
    fn copy_from_is_batched() {
        Spi::run(
            "CREATE EXTENSION IF NOT EXISTS audit_ext;
             CREATE EXTENSION IF NOT EXISTS amcheck;
             CREATE TABLE copied (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
             SELECT audit.track('copied');
             CREATE TABLE copied_parts (id int PRIMARY KEY, v int NOT NULL DEFAULT 0) PARTITION BY RANGE (id);
             CREATE TABLE copied_low PARTITION OF copied_parts FOR VALUES FROM (MINVALUE) TO (1000);
             CREATE TABLE copied_high PARTITION OF copied_parts FOR VALUES FROM (1000) TO (MAXVALUE);
             SELECT audit.track('copied_parts');",
        )
        .unwrap();
        let before = multi_inserts();
        Spi::run(&format!("COPY copied (id) FROM PROGRAM 'seq 1 {ROWS}'")).unwrap();
        assert!(multi_inserts() - before >= 3, "COPY's rows were batched");
        assert_in_order("copied", "INSERT", ROWS);
        // Into a partitioned table: written as they come, all of them.
        Spi::run(&format!("COPY copied_parts (id) FROM PROGRAM 'seq 1 {ROWS}'")).unwrap();
        let n = one(
            "SELECT count(*) FROM audit.log WHERE table_name IN ('copied_parts', 'copied_low', 'copied_high')",
        );
        assert_eq!(n, ROWS);
        assert_verifies();
    }
}
