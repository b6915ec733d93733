//! Quoting identifiers and literals into SQL text, by PostgreSQL's own rules:
//! `quote_identifier` quotes reserved words (a column named "order") as well as
//! anything not all lower case, and `quote_literal_cstr` writes E'…' when the
//! text holds a backslash, so the literal means the same under any
//! standard_conforming_strings. Every piece of SQL built from a name or a value
//! goes through here.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;

/// An identifier as SQL text. A name with a NUL byte cannot exist in PostgreSQL;
/// it is cut there, which can only make the statement fail, never change it.
pub fn ident(s: &str) -> String {
    let c = CString::new(s.split('\0').next().unwrap_or_default()).unwrap_or_default();
    // SAFETY: quote_identifier takes a NUL-terminated string and returns either it or a
    // palloc'd quoted copy, valid in the current memory context; we copy it out at once.
    unsafe { CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())).to_string_lossy().into_owned() }
}

/// A string literal as SQL text (see `ident` about NUL).
pub fn literal(s: &str) -> String {
    let c = CString::new(s.split('\0').next().unwrap_or_default()).unwrap_or_default();
    // SAFETY: quote_literal_cstr takes a NUL-terminated string and returns a palloc'd
    // quoted copy, valid in the current memory context; we copy it out at once.
    unsafe { CStr::from_ptr(pg_sys::quote_literal_cstr(c.as_ptr())).to_string_lossy().into_owned() }
}
