//! GUC settings. All are PGC_SUSET so `ALTER DATABASE … SET` works per database;
//! bad values are refused at SET time by the check hooks.

use std::ffi::{c_char, c_void, CStr, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;

pub static REQUIRE_ACTOR: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static ALLOW_DROP: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static CONTEXT_SETTINGS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(
        c"app.current_user, app.actor_type, app.actor_email, app.current_migration, app.request_id",
    ));
pub static PARTITION_INTERVAL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"1 month"));
pub static PREMAKE: GucSetting<i32> = GucSetting::<i32>::new(3);
/// crate::image: how often a `changes`-mode UPDATE writes the whole row.
pub static IMAGE_EVERY: GucSetting<i32> = GucSetting::<i32>::new(crate::image::DEFAULT_IMAGE_EVERY);
pub static RETENTION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static RETENTION_MODE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"drop"));
pub static NAPTIME: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static ACCESS_QUEUE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(2048);
pub static ACCESS_OVERFLOW: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"block"));
pub static ACCESS_BLOCK_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static ACCESS_LOG_SELF: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static ACCESS_PARAMETERS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static ACCESS_PARAMETER_MAX_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024);

/// What a reading backend does when the access-audit queue is full.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Overflow {
    /// Wait up to audit.access_block_timeout, then drop (and count) the record.
    Block,
    /// Drop (and count) the record at once.
    Drop,
    /// Fail the reading statement.
    Error,
}

/// The queue's size in records: fixed at server start (shared memory).
const MAX_ACCESS_QUEUE: i32 = 1 << 20;
const MIN_ACCESS_QUEUE: i32 = 16;

pub fn init() {
    GucRegistry::define_bool_guc(
        c"audit.require_actor",
        c"Refuse writes to tracked tables when app.current_user is not set.",
        c"",
        &REQUIRE_ACTOR,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"audit.allow_drop",
        c"Allow DROP EXTENSION audit_ext, and dropping or truncating audit data, in this session.",
        c"",
        &ALLOW_DROP,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY: the hooks are plain extern fns guarded by #[pg_guard]; the settings are 'static.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"audit.context_settings",
            c"Comma-separated setting names captured into audit.log.session_info.",
            c"",
            &CONTEXT_SETTINGS,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_context_settings),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"audit.partition_interval",
            c"Width of each audit.log partition (at least 1 hour).",
            c"",
            &PARTITION_INTERVAL,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_partition_interval),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"audit.retention",
            c"Partitions that end before now minus this interval are removed; empty keeps forever.",
            c"",
            &RETENTION,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_retention),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"audit.retention_mode",
            c"What retention does with an expired partition: drop, or detach into schema audit_archive.",
            c"",
            &RETENTION_MODE,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_retention_mode),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"audit.databases",
            c"Comma-separated databases the background worker serves; empty means all that have the extension.",
            c"",
            &DATABASES,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_databases),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"audit.premake",
        c"Number of audit.log partitions kept ahead of now.",
        c"",
        &PREMAKE,
        0,
        MAX_PREMAKE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"audit.image_every",
        c"A capture => 'changes' UPDATE also writes the whole new row about once in this many (0: only when its key moves).",
        c"Shorter walks for time travel against more bytes per UPDATE; see crate::image.",
        &IMAGE_EVERY,
        0,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"audit.access_log_self",
        c"Record reads of audit.log and audit.access_log themselves.",
        c"",
        &ACCESS_LOG_SELF,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"audit.access_parameters",
        c"Record the parameters of statements that read read-tracked tables.",
        c"",
        &ACCESS_PARAMETERS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"audit.access_parameter_max_size",
        c"The longest parameter value recorded with audit.access_parameters; longer ones are cut.",
        c"",
        &ACCESS_PARAMETER_MAX_SIZE,
        0,
        1 << 16,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"audit.access_block_timeout",
        c"With audit.access_overflow = block, how long a reader waits for room in the queue.",
        c"",
        &ACCESS_BLOCK_TIMEOUT,
        0,
        60_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    // SAFETY: the hook is a plain extern fn guarded by #[pg_guard]; the setting is 'static.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"audit.access_overflow",
            c"When the access-audit queue is full: block (wait, then drop), drop, or error.",
            c"",
            &ACCESS_OVERFLOW,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_access_overflow),
            None,
            None,
        );
    }
    // Shared memory is sized once, when the server starts.
    // SAFETY: a plain read of whether this is the preload pass.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_int_guc(
            c"audit.access_queue_size",
            c"Records the access-audit queue holds (shared memory; set at server start).",
            c"",
            &ACCESS_QUEUE_SIZE,
            MIN_ACCESS_QUEUE,
            MAX_ACCESS_QUEUE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"audit.naptime",
        c"How often the background worker runs maintenance and sealing; 0 pauses it.",
        c"",
        &NAPTIME,
        0,
        86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
}

fn guc_string(s: &GucSetting<Option<CString>>) -> String {
    s.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn partition_interval() -> String {
    guc_string(&PARTITION_INTERVAL)
}
pub fn retention() -> Option<String> {
    Some(guc_string(&RETENTION)).filter(|s| !s.trim().is_empty())
}
pub fn retention_detach() -> bool {
    guc_string(&RETENTION_MODE).trim().eq_ignore_ascii_case("detach")
}
pub fn databases() -> Vec<String> {
    split_list(&guc_string(&DATABASES))
}

/// Whether the worker serves the database this backend is connected to (the
/// launcher's own rule: audit.databases is empty or names it). Asked on every
/// recorded read, so the answer is kept until the setting's text changes.
pub fn serves_this_database() -> bool {
    thread_local! {
        static KEPT: std::cell::RefCell<Option<(Vec<u8>, bool)>> = const { std::cell::RefCell::new(None) };
    }
    // SAFETY: a plain read of our own setting's variable: NULL or a string the GUC
    // machinery owns until the setting changes; it is copied before anything else runs.
    let raw = unsafe {
        let p = *DATABASES.as_ptr();
        if p.is_null() {
            &[][..]
        } else {
            std::ffi::CStr::from_ptr(p).to_bytes()
        }
    };
    if let Some(answer) = KEPT.with(|k| k.borrow().as_ref().filter(|(t, _)| t == raw).map(|k| k.1))
    {
        return answer;
    }
    let list = split_list(&String::from_utf8_lossy(raw));
    let answer = list.is_empty()
        || {
            // Looked up once, while a transaction is sound (the first read is prepared
            // in ExecutorStart): this is also asked while a transaction aborts and at
            // exit, where no catalog may be read. A database cannot be renamed while
            // anyone is connected to it.
            thread_local! {
                static NAME: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
            }
            if NAME.with(|n| n.borrow().is_none()) {
                // SAFETY: a plain read of transaction state.
                if !unsafe { pgrx::pg_sys::IsTransactionState() } {
                    return true; // unknown: the launcher still decides what it serves
                }
                // SAFETY: a syscache lookup in a sound transaction; NULL if the database vanished.
                let found = unsafe {
                    let p = pgrx::pg_sys::get_database_name(pgrx::pg_sys::MyDatabaseId);
                    (!p.is_null())
                        .then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
                };
                NAME.with(|n| *n.borrow_mut() = found);
            }
            let name = NAME.with(|n| n.borrow().clone()).unwrap_or_default();
            list.contains(&name)
        };
    KEPT.with(|k| *k.borrow_mut() = Some((raw.to_vec(), answer)));
    answer
}

pub fn access_overflow() -> Overflow {
    match guc_string(&ACCESS_OVERFLOW).trim().to_ascii_lowercase().as_str() {
        "drop" => Overflow::Drop,
        "error" => Overflow::Error,
        _ => Overflow::Block,
    }
}

/// None when the worker is paused (`audit.naptime = 0`).
pub fn naptime() -> Option<std::time::Duration> {
    Some(NAPTIME.get()).filter(|n| *n > 0).map(|n| std::time::Duration::from_secs(n as u64))
}

pub fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect()
}

/// Seconds in an interval written as `<n> <unit>` pairs: the subset of PostgreSQL's
/// interval syntax we accept, so validation here and `::interval` in SQL agree.
/// Months count as 30 days and years as 365 for the lower-bound check only.
pub fn parse_interval_secs(s: &str) -> Result<i64, String> {
    let words: Vec<&str> = s.split_whitespace().collect();
    if words.is_empty() {
        return Err("empty interval".into());
    }
    let mut total: i64 = 0;
    let mut i = 0;
    while i < words.len() {
        let (num, unit) = match words[i].find(|c: char| c.is_ascii_alphabetic()) {
            Some(p) if p > 0 => (&words[i][..p], &words[i][p..]),
            _ => {
                let u = words.get(i + 1).ok_or_else(|| format!("\"{s}\" is missing a unit"))?;
                i += 1;
                (words[i - 1], *u)
            }
        };
        i += 1;
        let n: i64 = num.parse().map_err(|_| format!("\"{num}\" is not a whole number"))?;
        if n <= 0 {
            return Err("the amount must be positive".into());
        }
        let unit_secs = match unit.to_ascii_lowercase().trim_end_matches('s') {
            "minute" | "min" => 60,
            "hour" | "h" | "hr" => 3600,
            "day" | "d" => 86400,
            "week" | "w" => 7 * 86400,
            "month" | "mon" => 30 * 86400,
            "year" | "y" | "yr" => 365 * 86400,
            other => {
                return Err(format!(
                    "unknown unit \"{other}\" (use hours, days, weeks, months or years)"
                ))
            }
        };
        total = total
            .checked_add(n.checked_mul(unit_secs).ok_or("interval too large")?)
            .ok_or("interval too large")?;
    }
    Ok(total)
}

/// # Safety
/// Called by PostgreSQL's GUC machinery with a valid (possibly NULL) string.
unsafe fn new_value<'a>(newval: *mut *mut c_char) -> &'a str {
    // SAFETY: newval is null or points to a (possibly null) C string the GUC
    // machinery keeps alive for the check hook's call.
    unsafe {
        if newval.is_null() || (*newval).is_null() {
            return "";
        }
        CStr::from_ptr(*newval).to_str().unwrap_or("\u{FFFD}")
    }
}

fn check_fail(msg: String) -> bool {
    let c = CString::new(msg).unwrap_or_default();
    // SAFETY: GUC_check_errdetail_string must be palloc'd; pstrdup copies into the current context.
    unsafe {
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(c.as_ptr());
    }
    false
}

/// The widest settings maintain() can compute with: now plus `audit.premake`
/// (at most 1000) partitions of 100 years stays far inside timestamptz's range
/// (year 294276), and so does now minus 1000 years (4713 BC is its start).
/// Wider values are refused when set, instead of failing maintenance later.
const MAX_PREMAKE: i32 = 1000;
const YEAR_SECS: i64 = 365 * 86_400 + 86_400 / 4;
const MAX_PARTITION_INTERVAL_SECS: i64 = 100 * YEAR_SECS;
const MAX_RETENTION_SECS: i64 = 1000 * YEAR_SECS;

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_partition_interval(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the GUC machinery's own pointer, as new_value requires.
    let value = unsafe { new_value(newval) };
    match parse_interval_secs(value) {
        Ok(secs) if (3600..=MAX_PARTITION_INTERVAL_SECS).contains(&secs) => true,
        Ok(secs) if secs < 3600 => {
            check_fail("audit.partition_interval must be at least 1 hour.".into())
        }
        Ok(_) => check_fail("audit.partition_interval must be at most 100 years.".into()),
        Err(e) => check_fail(format!("audit.partition_interval: {e}.")),
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_retention(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the GUC machinery's own pointer, as new_value requires.
    let v = unsafe { new_value(newval) };
    if v.trim().is_empty() {
        return true;
    }
    match parse_interval_secs(v) {
        Ok(secs) if secs <= MAX_RETENTION_SECS => true,
        Ok(_) => check_fail(
            "audit.retention must be at most 1000 years; leave it empty to keep forever.".into(),
        ),
        Err(e) => check_fail(format!("audit.retention: {e}; leave it empty to keep forever.")),
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_retention_mode(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the GUC machinery's own pointer, as new_value requires.
    let value = unsafe { new_value(newval) };
    match value.trim().to_ascii_lowercase().as_str() {
        "drop" | "detach" => true,
        _ => check_fail("audit.retention_mode must be \"drop\" or \"detach\".".into()),
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_access_overflow(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the GUC machinery's own pointer, as new_value requires.
    let value = unsafe { new_value(newval) };
    match value.trim().to_ascii_lowercase().as_str() {
        "block" | "drop" | "error" => true,
        _ => check_fail("audit.access_overflow must be \"block\", \"drop\" or \"error\".".into()),
    }
}

fn valid_setting_name(n: &str) -> bool {
    !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_context_settings(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the GUC machinery's own pointer, as new_value requires.
    let value = unsafe { new_value(newval) };
    for name in split_list(value) {
        if !valid_setting_name(&name) {
            return check_fail(format!("\"{name}\" is not a valid setting name."));
        }
    }
    true
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_databases(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the GUC machinery's own pointer, as new_value requires.
    let value = unsafe { new_value(newval) };
    for name in split_list(value) {
        if name.len() >= pg_sys::NAMEDATALEN as usize {
            return check_fail(format!("\"{name}\" is too long for a database name."));
        }
    }
    true
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::parse_interval_secs;
    use pgrx::prelude::*;

    #[pg_test]
    fn intervals() {
        assert_eq!(parse_interval_secs("1 hour"), Ok(3600));
        assert_eq!(parse_interval_secs("1 month"), Ok(30 * 86400));
        assert_eq!(parse_interval_secs("2 weeks 1 day"), Ok(15 * 86400));
        assert_eq!(parse_interval_secs("90d"), Ok(90 * 86400));
        assert!(parse_interval_secs("").is_err());
        assert!(parse_interval_secs("0 hours").is_err());
        assert!(parse_interval_secs("3 fortnights").is_err());
        assert!(parse_interval_secs("soon").is_err());
    }
}
