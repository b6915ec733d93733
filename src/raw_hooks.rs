//! PostgreSQL's standard executor and utility functions, declared without
//! pgrx's guard, for the hooks that wrap them (crate::access::hooks,
//! crate::log::batch).
//!
//! Each hook is a plain frame around a call of the previous hook (or of one of
//! these): an ERROR raised below passes through it exactly as through C, with
//! every field of the error intact (pgrx's guard would rebuild the error and lose
//! its constraint, table and context fields, for every statement of the server).
//! Such a frame holds nothing that needs dropping; the Rust work happens before
//! and after, in guarded helpers.

use std::ffi::c_char;

use pgrx::pg_sys;

unsafe extern "C-unwind" {
    #[link_name = "standard_ExecutorStart"]
    pub(crate) fn raw_standard_executor_start(qd: *mut pg_sys::QueryDesc, eflags: i32);
    #[cfg(not(feature = "pg18"))]
    #[link_name = "standard_ExecutorRun"]
    pub(crate) fn raw_standard_executor_run(
        qd: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
        execute_once: bool,
    );
    #[cfg(feature = "pg18")]
    #[link_name = "standard_ExecutorRun"]
    pub(crate) fn raw_standard_executor_run(
        qd: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
    );
    #[link_name = "standard_ExecutorFinish"]
    pub(crate) fn raw_standard_executor_finish(qd: *mut pg_sys::QueryDesc);
    #[link_name = "standard_ExecutorEnd"]
    pub(crate) fn raw_standard_executor_end(qd: *mut pg_sys::QueryDesc);
    #[link_name = "standard_ProcessUtility"]
    pub(crate) fn raw_standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query: *const c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}
