//! Who made the change: `changed_by` from `app.current_user`, `db_user` from
//! `session_user`, and `session_info`. Everything is read from GUCs and the
//! backend's own state (no catalog query), and the jsonb is rebuilt only when
//! one of its inputs changed.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};

use pgrx::pg_sys::{self, Datum};
use serde_json::Value;

use crate::capture::encode;
use crate::errors::{AuditError, Result};
use crate::settings;

/// The setting an application sets to name its user (the actor).
const CURRENT_USER: &CStr = c"app.current_user";
const JSON_ACTOR_KEYS: [&str; 4] = ["email", "user_id", "id", "name"];

/// The session_info jsonb, kept as raw varlena bytes so one copy serves every row.
/// It does not depend on the actor (unless `audit.context_settings` names it), so
/// a pool that sets a new actor per transaction does not rebuild it.
pub struct Context {
    key: Vec<u8>,
    /// Text values here are bytes in the database encoding, as stored and hashed.
    pub db_user: Vec<u8>,
    bytes: Vec<u64>, // u64 storage keeps the varlena header aligned
    pub text: Vec<u8>,
}

/// Who and where: the actor plus the session's context.
pub struct SessionInfo {
    key: Vec<u8>,
    context: std::rc::Rc<Context>,
    pub changed_by: Vec<u8>,
}

impl SessionInfo {
    pub fn datum(&self) -> Datum {
        Datum::from(self.context.bytes.as_ptr())
    }
    /// session_info's jsonb text, which the row hash covers.
    pub fn text(&self) -> &[u8] {
        &self.context.text
    }
    pub fn db_user(&self) -> &[u8] {
        &self.context.db_user
    }
    /// The actor's columns of an audit row.
    pub fn actor(&self) -> crate::log::Actor<'_> {
        crate::log::Actor {
            changed_by: &self.changed_by,
            db_user: self.db_user(),
            session_info: self.datum(),
            session_text: self.text(),
        }
    }
}

thread_local! {
    static CACHE: RefCell<Option<std::rc::Rc<SessionInfo>>> = const { RefCell::new(None) };
    static CONTEXT: RefCell<Option<std::rc::Rc<Context>>> = const { RefCell::new(None) };
}

/// `changed_by` and the parsed JSON object, if `app.current_user` holds one.
/// `utf8_db`: whether the database encoding is UTF-8 (jsonb can then hold any character).
pub fn actor_from(value: &str, utf8_db: bool) -> (String, Option<Value>) {
    if !value.trim_start().starts_with('{') {
        return (value.to_string(), None); // not an object: no need to parse
    }
    match serde_json::from_str::<Value>(value) {
        // Kept as an object only if jsonb can hold it exactly: anything jsonb_in would
        // refuse (a NUL character, a number beyond numeric's range) must not make the
        // user's write fail, so such an actor is recorded as its text instead.
        Ok(Value::Object(map))
            if map
                .iter()
                .all(|(k, v)| jsonb_can_hold_key(k, utf8_db) && jsonb_can_hold(v, utf8_db)) =>
        {
            let by = JSON_ACTOR_KEYS
                .iter()
                .find_map(|k| match map.get(*k) {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                })
                .unwrap_or_else(|| value.to_string());
            (by, Some(Value::Object(map)))
        }
        _ => (value.to_string(), None),
    }
}

/// Whether jsonb_in accepts this value's JSON text as it is. It refuses `\u0000`
/// in strings and keys, numbers numeric cannot represent, and (in a database
/// that is not UTF-8) characters the database encoding may not have.
fn jsonb_can_hold(v: &Value, utf8: bool) -> bool {
    match v {
        Value::String(s) => jsonb_can_hold_key(s, utf8),
        Value::Number(n) => number_fits_numeric(&n.to_string()),
        Value::Array(a) => a.iter().all(|x| jsonb_can_hold(x, utf8)),
        Value::Object(m) => {
            m.iter().all(|(k, x)| jsonb_can_hold_key(k, utf8) && jsonb_can_hold(x, utf8))
        }
        Value::Bool(_) | Value::Null => true,
    }
}

/// A string (key or value) jsonb_in takes as it is.
fn jsonb_can_hold_key(s: &str, utf8: bool) -> bool {
    !s.contains('\0') && (utf8 || s.is_ascii())
}

/// A JSON number's text that numeric_in takes without overflow: well inside
/// numeric's limits (131072 digits before the point, 16383 after).
fn number_fits_numeric(n: &str) -> bool {
    let (mantissa, exp) = match n.find(['e', 'E']) {
        Some(i) => (&n[..i], n[i + 1..].parse::<i64>().unwrap_or(i64::MAX)),
        None => (n, 0),
    };
    let digits = mantissa.bytes().filter(u8::is_ascii_digit).count() as i64;
    exp.unsigned_abs() <= 10_000 && digits <= 10_000
}

/// Called only when session_info is rebuilt, which its cache key (with the session user) decides.
fn session_user_name() -> Vec<u8> {
    // SAFETY: the session user always exists (noerr=false would ERROR); a palloc'd C string.
    unsafe {
        CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), false))
            .to_bytes()
            .to_vec()
    }
}

fn client_info() -> (Option<String>, Option<i64>) {
    thread_local! {
        static CLIENT: RefCell<Option<(Option<String>, Option<i64>)>> = const { RefCell::new(None) };
    }
    if let Some(c) = CLIENT.with(|c| c.borrow().clone()) {
        return c;
    }
    // SAFETY: inet_client_addr/port take no arguments and return NULL for Unix sockets
    // and background processes; the address is printed by inet's own output function.
    let c = unsafe {
        let addr = pgrx::direct_function_call_as_datum(pg_sys::inet_client_addr, &[]).map(|d| {
            String::from_utf8_lossy(&crate::datum::output_bytes(d, pg_sys::INETOID)).into_owned()
        });
        let port = pgrx::direct_function_call::<i32>(pg_sys::inet_client_port, &[]).map(i64::from);
        (addr, port)
    };
    CLIENT.with(|cl| *cl.borrow_mut() = Some(c.clone()));
    c
}

/// The current session info, rebuilt only when a captured setting changed.
/// Enforces `audit.require_actor`.
pub fn current() -> Result<std::rc::Rc<SessionInfo>> {
    session_info(true)
}

/// As `current`, for DDL records, which `audit.require_actor` does not block.
pub fn current_for_ddl() -> Result<std::rc::Rc<SessionInfo>> {
    session_info(false)
}

/// A setting's current value, borrowed from the GUC machinery: valid until the
/// setting changes, so use it before running anything else.
fn raw_setting(name: &CStr) -> Option<&'static CStr> {
    // SAFETY: GetConfigOption with missing_ok returns NULL or a NUL-terminated string it owns.
    let p = unsafe { pg_sys::GetConfigOption(name.as_ptr(), true, false) };
    // SAFETY: checked for NULL; the string outlives this row's use of it.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

/// A C string variable that the GUC machinery keeps (NULL or a string it owns).
/// Read directly, it costs no lookup by name; valid until the setting changes.
fn guc_variable(p: *const c_char) -> Option<&'static CStr> {
    // SAFETY: checked for NULL; the GUC machinery owns the string until the next assignment.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

fn application_name() -> &'static [u8] {
    // SAFETY: a plain read of the variable behind the application_name setting.
    guc_variable(unsafe { pg_sys::application_name }).map(CStr::to_bytes).unwrap_or_default()
}

/// The names in audit.context_settings, re-split only when the setting changes.
fn context_names() -> std::rc::Rc<Vec<CString>> {
    thread_local! {
        static NAMES: RefCell<(Vec<u8>, std::rc::Rc<Vec<CString>>)> = RefCell::new((vec![0xff], Default::default()));
    }
    // SAFETY: a plain read of our own setting's variable.
    let raw = guc_variable(unsafe { *settings::CONTEXT_SETTINGS.as_ptr() })
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    NAMES.with(|n| {
        let mut n = n.borrow_mut();
        if n.0 != raw {
            let list = settings::split_list(&String::from_utf8_lossy(raw));
            n.1 = std::rc::Rc::new(list.into_iter().filter_map(|s| CString::new(s).ok()).collect());
            n.0 = raw.to_vec();
        }
        n.1.clone()
    })
}

fn session_info(require_actor: bool) -> Result<std::rc::Rc<SessionInfo>> {
    let current_user = raw_setting(CURRENT_USER);
    let actor = current_user.filter(|v| !v.to_bytes().is_empty());
    if require_actor && settings::REQUIRE_ACTOR.get() && actor.is_none() {
        return Err(AuditError::ActorRequired);
    }
    // The context's own key covers the session user (changed_by's fallback).
    let context = context(current_user)?;
    let key = actor.map(|c| c.to_bytes()).unwrap_or_default();
    if let Some(hit) = CACHE.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|s| s.key == key && std::rc::Rc::ptr_eq(&s.context, &context))
            .cloned()
    }) {
        return Ok(hit);
    }
    let key = key.to_vec();
    let changed_by = match actor.map(|u| (u, std::str::from_utf8(u.to_bytes()))) {
        Some((_, Ok(u))) => actor_from(u, crate::db_text::db_is_utf8()).0.into_bytes(),
        Some((u, Err(_))) => u.to_bytes().to_vec(), // not UTF-8 (another database encoding): kept as it is
        None => context.db_user.clone(),
    };
    let info = std::rc::Rc::new(SessionInfo { key, context, changed_by });
    CACHE.with(|c| *c.borrow_mut() = Some(info.clone()));
    Ok(info)
}

/// The session_info jsonb, rebuilt only when one of its inputs changed.
/// `current_user` is app.current_user's value, already read by the caller.
fn context(current_user: Option<&'static CStr>) -> Result<std::rc::Rc<Context>> {
    let names = context_names();
    let setting = |n: &CStr| if n == CURRENT_USER { current_user } else { raw_setting(n) };
    // The cache key: every input of session_info, read without allocating per row.
    // SAFETY: plain accessor of backend state.
    let session_user = unsafe { pg_sys::GetSessionUserId() };
    let mut key = Vec::with_capacity(128);
    key.extend_from_slice(&session_user.to_u32().to_le_bytes());
    key.extend_from_slice(application_name());
    for n in names.iter() {
        key.push(2);
        key.extend_from_slice(n.to_bytes());
        key.push(3);
        key.extend_from_slice(setting(n).map(|c| c.to_bytes()).unwrap_or_default());
    }
    if let Some(hit) = CONTEXT.with(|c| c.borrow().as_ref().filter(|s| s.key == key).cloned()) {
        return Ok(hit);
    }

    // Built by jsonb_build_object from the values themselves: no JSON text to parse.
    let app_name = application_name().to_vec();
    let values: Vec<Option<Vec<u8>>> = names
        .iter()
        .map(|n| setting(n).map(|v| v.to_bytes().to_vec()).filter(|v| !v.is_empty()))
        .collect();
    let (addr, port) = client_info();
    // SAFETY: every datum is built here, in the current memory context, with the type
    // given next to it; the result is copied out before that context is reset.
    let (bytes, text) = unsafe {
        let mut items: Vec<encode::Item> = Vec::with_capacity(4 + names.len());
        let text_item = |key: &'static CStr, v: Option<&[u8]>| encode::Item {
            key,
            value: v.map(|v| crate::datum::text_datum(v)).unwrap_or(Datum::from(0)),
            isnull: v.is_none(),
            typid: pg_sys::TEXTOID,
        };
        items.push(text_item(c"application_name", Some(&app_name)));
        items.push(text_item(c"client_addr", addr.as_deref().map(str::as_bytes)));
        items.push(encode::Item {
            key: c"client_port",
            value: Datum::from(port.unwrap_or(0)),
            isnull: port.is_none(),
            typid: pg_sys::INT8OID,
        });
        items.push(encode::Item {
            key: c"backend_pid",
            value: Datum::from(pg_sys::MyProcPid),
            isnull: false,
            typid: pg_sys::INT4OID,
        });
        for (n, v) in names.iter().zip(&values) {
            let Some(v) = v else { continue };
            // An actor given as a JSON object is kept as that object.
            let parsed = (n.as_c_str() == CURRENT_USER)
                .then(|| {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|v| actor_from(v, crate::db_text::db_is_utf8()).1)
                })
                .flatten()
                .and_then(|obj| CString::new(obj.to_string()).ok());
            let (value, typid) = match parsed {
                Some(json) => (encode::jsonb_from_str(&json), pg_sys::JSONBOID),
                None => (crate::datum::text_datum(v), pg_sys::TEXTOID),
            };
            items.push(encode::Item { key: n.as_c_str(), value, isnull: false, typid });
        }
        let d = build_object(&items);
        let p = d.cast_mut_ptr::<pg_sys::varlena>();
        let len = pgrx::varlena::varsize_any(p);
        let mut buf = vec![0u64; len.div_ceil(8)];
        std::ptr::copy_nonoverlapping(p as *const u8, buf.as_mut_ptr() as *mut u8, len);
        let mut text = Vec::with_capacity(256);
        crate::chain::jsonb_text::datum_text(d, &mut text).map_err(AuditError::Internal)?;
        (buf, text)
    };
    let ctx = std::rc::Rc::new(Context { key, db_user: session_user_name(), bytes, text });
    CONTEXT.with(|c| *c.borrow_mut() = Some(ctx.clone()));
    Ok(ctx)
}

/// jsonb_build_object of the items through a builder prepared for their keys and
/// types, kept while they stay the same: an application that sets a new actor
/// per transaction rebuilds session_info every time, with the same shape.
///
/// # Safety
/// As [`encode::ObjectBuilder::build`]; must run inside a transaction.
unsafe fn build_object(items: &[encode::Item]) -> Datum {
    type Shape = Vec<(CString, pg_sys::Oid)>;
    thread_local! {
        static BUILDER: RefCell<Option<(Shape, encode::ObjectBuilder)>> = const { RefCell::new(None) };
    }
    BUILDER.with(|b| {
        let mut b = b.borrow_mut();
        let same = b.as_ref().is_some_and(|(shape, _)| {
            shape.len() == items.len()
                && shape
                    .iter()
                    .zip(items)
                    .all(|((k, t), it)| k.as_c_str() == it.key && *t == it.typid)
        });
        if !same {
            let keys: Vec<&CStr> = items.iter().map(|it| it.key).collect();
            let types: Vec<pg_sys::Oid> = items.iter().map(|it| it.typid).collect();
            // SAFETY: inside a transaction (the caller's); keys and types have equal length.
            let builder = unsafe { encode::ObjectBuilder::new(&keys, &types) };
            *b = Some((items.iter().map(|it| (it.key.to_owned(), it.typid)).collect(), builder));
        }
        let values: Vec<(Datum, bool)> = items.iter().map(|it| (it.value, it.isnull)).collect();
        // SAFETY: the values follow the builder's keys and types (checked above).
        unsafe { b.as_ref().expect("builder set above").1.build(&values) }
    })
}

#[cfg(test)]
mod tests {
    use super::actor_from;

    #[test]
    fn actor_rules() {
        assert_eq!(actor_from("batch_script@system", true).0, "batch_script@system");
        assert_eq!(actor_from(r#"{"user_id": 7, "email": "a@b.c"}"#, true).0, "a@b.c");
        assert_eq!(actor_from(r#"{"user_id": 7}"#, true).0, "7");
        assert_eq!(actor_from(r#"{"name": "n", "id": "i"}"#, true).0, "i");
        assert_eq!(actor_from(r#"{"other": 1}"#, true).0, r#"{"other": 1}"#);
        assert_eq!(actor_from(r#"{"email": "#, true).0, r#"{"email": "#);
        assert!(actor_from(r#"{"email": "#, true).1.is_none());
        assert_eq!(actor_from("[1,2]", true).0, "[1,2]");
        assert_eq!(actor_from("42", true).0, "42");
        // Kept as text when jsonb could not hold the object exactly.
        assert!(actor_from(r#"{"email": "a\u0000b"}"#, true).1.is_none());
        assert!(actor_from(r#"{"a\u0000": 1}"#, true).1.is_none());
        assert!(actor_from(r#"{"n": 1e100000}"#, true).1.is_none());
        assert!(actor_from(r#"{"n": 1e100}"#, true).1.is_some());
        assert!(actor_from(r#"{"email": "\u00e9"}"#, false).1.is_none());
        assert!(actor_from(r#"{"email": "\u00e9"}"#, true).1.is_some());
    }
}
