//! Text in the database encoding, carried through Rust and back exactly.
//!
//! pgrx makes Rust strings of text only when it is UTF-8 (in a LATIN1 or
//! SQL_ASCII database it raises on anything else), and hands Rust strings back
//! as their UTF-8 bytes, which such a database reads as other characters. A
//! report that names the log's own text (a row_id, a column name) must give
//! back the very bytes the log holds, so that a user can look the row up with
//! it. These are the two crossings: [`to_rust`] on the way in, [`DbText`] on
//! the way out.
//!
//! In a UTF-8 database both are the identity. In any other, each byte becomes
//! the character of the same number (U+0000 to U+00FF) and back: a bijection,
//! whatever the encoding, and ASCII stays ASCII, so JSON and SQL syntax read
//! the same. Every server encoding is a superset of ASCII whose other
//! characters use only bytes from 0x80 up, so no byte of such a character is
//! ever taken for a quote or a bracket.

use std::borrow::Cow;

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::{impl_sql_translatable, IntoDatum};

pub fn db_is_utf8() -> bool {
    // SAFETY: a plain read of the database encoding.
    unsafe { pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32 }
}

/// Bytes in the database encoding as a Rust string that [`to_db`] turns back
/// into the same bytes.
pub fn to_rust(b: &[u8]) -> Cow<'_, str> {
    if b.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        return Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(b) });
    }
    if db_is_utf8() {
        if let Ok(s) = std::str::from_utf8(b) {
            return Cow::Borrowed(s);
        }
    }
    Cow::Owned(bytes_as_chars(b))
}

fn bytes_as_chars(b: &[u8]) -> String {
    b.iter().map(|&c| char::from(c)).collect()
}

fn chars_as_bytes(s: &str) -> Vec<u8> {
    s.chars().map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?')).collect()
}

/// The inverse of [`to_rust`]. A character it cannot have made (above U+00FF,
/// outside a UTF-8 database) becomes `?`.
pub fn to_db(s: &str) -> Cow<'_, [u8]> {
    if s.is_ascii() || db_is_utf8() {
        return Cow::Borrowed(s.as_bytes());
    }
    Cow::Owned(chars_as_bytes(s))
}

/// A text result, as bytes in the database encoding (a string made by
/// [`to_rust`] and our own ASCII, through [`DbText::from_rust`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbText(Vec<u8>);

impl DbText {
    pub fn from_rust(s: &str) -> DbText {
        DbText(to_db(s).into_owned())
    }
}

impl IntoDatum for DbText {
    fn into_datum(self) -> Option<Datum> {
        let len = i32::try_from(self.0.len()).ok()?;
        // SAFETY: copies `len` bytes into a fresh text varlena in the current context.
        Some(Datum::from(unsafe { pg_sys::cstring_to_text_with_len(self.0.as_ptr().cast(), len) }))
    }

    fn type_oid() -> Oid {
        pg_sys::TEXTOID
    }
}

// SAFETY: returns the datum into_datum made (a fresh text), or NULL, as pgrx's own
// text results do.
unsafe impl BoxRet for DbText {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        match self.into_datum() {
            // SAFETY: a valid text datum, returned as the function's result.
            Some(d) => unsafe { fcinfo.return_raw_datum(d) },
            None => fcinfo.return_null(),
        }
    }
}

impl_sql_translatable!(DbText, "text");

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    /// Every byte string survives the trip, whatever the database encoding.
    /// The test database is UTF-8, so the byte map is checked on its own here;
    /// tests/encoding.rs runs it in LATIN1 and SQL_ASCII databases.
    #[pg_test]
    fn the_byte_map_is_a_bijection() {
        let all: Vec<u8> = (0..=255u8).collect();
        let mapped = bytes_as_chars(&all);
        assert_eq!(mapped.chars().count(), 256);
        assert!(mapped.is_char_boundary(1) && mapped.starts_with('\0'));
        assert_eq!(chars_as_bytes(&mapped), all);
        assert_eq!(chars_as_bytes("a\u{100}b"), b"a?b");
        assert!(db_is_utf8());
        assert_eq!(to_rust("Müller".as_bytes()), "Müller");
        assert_eq!(to_db("Müller").as_ref(), "Müller".as_bytes());
    }
}
