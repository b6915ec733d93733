//! Text in the database encoding, carried through Rust and back exactly.
//!
//! pgrx makes Rust strings of text only when it is UTF-8 (in a LATIN1 or
//! SQL_ASCII database it raises on anything else), and hands Rust strings back
//! as their UTF-8 bytes, which such a database reads as other characters.
//! What audit_ext gives back of the log's own text (time travel's images, a
//! row_id in a report, what undo writes back) must be the very bytes the log
//! holds. [`to_rust`] and [`to_db`] are the two crossings; [`DbText`] and
//! [`DbJson`] make them for arguments, SPI reads, results and query parameters.
//! Identifiers are another matter: audit_ext writes them into the SQL it runs,
//! and pgrx carries SQL as UTF-8. So outside a UTF-8 database they must be
//! ASCII (README, "Database encodings"), and [`ident`] and [`rel_names`] are
//! where every name is read and a name that is not is refused, with an error
//! of its own rather than pgrx's panic.
//!
//! In a UTF-8 database both are the identity. In any other, each byte becomes
//! the character of the same number (U+0000 to U+00FF) and back: a bijection,
//! whatever the encoding, and ASCII stays ASCII, so JSON and SQL syntax read
//! the same. Every server encoding is a superset of ASCII whose other
//! characters use only bytes from 0x80 up, so no byte of such a character is
//! ever taken for a quote or a bracket.

use std::borrow::Cow;
use std::ffi::CString;

use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::fcinfo::direct_function_call_as_datum;
use pgrx::nullable::Nullable;
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::{impl_sql_translatable, FromDatum, IntoDatum};
use serde_json::Value;

use crate::errors::{AuditError, Result as AuditResult};

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

/// Text values (a text[] read as `Vec<DbText>`) as the strings they carry.
pub fn strings(v: Option<Vec<DbText>>) -> Option<Vec<String>> {
    v.map(|v| v.into_iter().map(|t| t.0).collect())
}

/// A schema, table or column name as Rust text, from its bytes in the database
/// encoding; refused outside a UTF-8 database unless it is ASCII (see above).
pub fn ident(b: &[u8]) -> AuditResult<String> {
    match std::str::from_utf8(b) {
        Ok(s) if b.is_ascii() || db_is_utf8() => Ok(s.to_owned()),
        _ => Err(non_ascii(b)),
    }
}

/// [`ident`] of a name read as [`DbText`] (from a catalog or the log).
pub fn ident_text(t: &DbText) -> AuditResult<String> {
    ident(&to_db(&t.0))
}

/// [`ident`] of a NUL-terminated name (a NameData's).
///
/// # Safety
/// `p` points to a NUL-terminated string.
pub unsafe fn ident_ptr(p: *const std::ffi::c_char) -> AuditResult<String> {
    // SAFETY: the caller's contract.
    ident(unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes())
}

/// A relation's schema and name, read through [`ident`].
pub struct RelNames {
    pub schema: String,
    pub table: String,
}

impl RelNames {
    /// `schema.table`, each quoted as SQL needs it.
    pub fn qualified(&self) -> String {
        format!("{}.{}", crate::quote::ident(&self.schema), crate::quote::ident(&self.table))
    }
}

/// The schema and name of an open relation, through [`ident`].
pub fn rel_names(rel: &pgrx::PgRelation) -> AuditResult<RelNames> {
    // SAFETY: rd_rel is valid while the relation is open; relname is a NameData;
    // get_namespace_name returns a palloc'd copy, or NULL for a schema gone.
    unsafe {
        let table = ident_ptr((*rel.rd_rel).relname.data.as_ptr())?;
        let ns = pg_sys::get_namespace_name((*rel.rd_rel).relnamespace);
        if ns.is_null() {
            return Err(AuditError::Internal(format!("the schema of {table} does not exist")));
        }
        Ok(RelNames { schema: ident_ptr(ns)?, table })
    }
}

/// [`ident`] of a column of a tuple descriptor.
pub fn att_name(att: &pg_sys::FormData_pg_attribute) -> AuditResult<String> {
    // SAFETY: attname is a NUL-terminated NameData.
    unsafe { ident_ptr(att.attname.data.as_ptr()) }
}

fn non_ascii(b: &[u8]) -> AuditError {
    // The name in ASCII, other bytes as \xNN: the message is sent in the
    // database encoding, and a byte's number is the same in every one.
    let shown = b
        .iter()
        .map(|&c| {
            if c.is_ascii() && !c.is_ascii_control() {
                char::from(c).to_string()
            } else {
                format!("\\x{c:02x}")
            }
        })
        .collect::<String>();
    // SAFETY: a plain read of the database encoding's name (a static string).
    let enc = unsafe { std::ffi::CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) };
    AuditError::NonAsciiIdentifier { name: shown, encoding: enc.to_string_lossy().into_owned() }
}

/// Text of the database as Rust text made by [`to_rust`]: read from SPI rows
/// and arguments, and written back as the same bytes, as a result or a query
/// parameter. pgrx's `String` would raise on such text, or write other bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DbText(pub String);

impl DbText {
    pub fn from_rust(s: &str) -> DbText {
        DbText(s.to_owned())
    }
}

impl FromDatum for DbText {
    unsafe fn from_polymorphic_datum(datum: Datum, is_null: bool, _typoid: Oid) -> Option<Self> {
        if is_null || datum.is_null() {
            return None;
        }
        // SAFETY: a text datum (the caller's contract); the bytes are copied.
        let bytes = unsafe { crate::live_rows::text_slice(datum) };
        Some(DbText(to_rust(bytes).into_owned()))
    }
}

// SAFETY: an element of a text[] is a text datum, detoasted by the array's reader.
unsafe impl pgrx::datum::UnboxDatum for DbText {
    type As<'src> = DbText;
    unsafe fn unbox<'src>(datum: pgrx::datum::Datum<'src>) -> DbText
    where
        Self: 'src,
    {
        // SAFETY: as above; the bytes are copied.
        let bytes = unsafe { crate::live_rows::text_slice(datum.sans_lifetime()) };
        DbText(to_rust(bytes).into_owned())
    }
}

impl IntoDatum for DbText {
    fn into_datum(self) -> Option<Datum> {
        let bytes = to_db(&self.0);
        let len = i32::try_from(bytes.len()).ok()?;
        // SAFETY: copies `len` bytes into a fresh text varlena in the current context.
        Some(Datum::from(unsafe { pg_sys::cstring_to_text_with_len(bytes.as_ptr().cast(), len) }))
    }

    fn type_oid() -> Oid {
        pg_sys::TEXTOID
    }
}

/// jsonb of the database as a serde value whose strings [`to_rust`] made:
/// read through the exact text jsonb_out writes (crate::chain::jsonb_text),
/// written back through jsonb_in with the same bytes. Numbers keep their
/// digits (serde_json's arbitrary_precision).
#[derive(Debug, Clone, PartialEq)]
pub struct DbJson(pub Value);

impl FromDatum for DbJson {
    unsafe fn from_polymorphic_datum(datum: Datum, is_null: bool, _typoid: Oid) -> Option<Self> {
        if is_null || datum.is_null() {
            return None;
        }
        let mut buf = Vec::new();
        // SAFETY: a jsonb datum (the caller's contract).
        let read =
            unsafe { crate::chain::jsonb_text::datum_text(datum, &mut buf) }.and_then(|()| {
                serde_json::from_str::<Value>(&to_rust(&buf)).map_err(|e| e.to_string())
            });
        match read {
            Ok(v) => Some(DbJson(v)),
            // The text is jsonb_out's, which is JSON: only a bug gets here.
            Err(e) => pgrx::error!("audit_ext: a jsonb value could not be read: {e}"),
        }
    }
}

impl IntoDatum for DbJson {
    fn into_datum(self) -> Option<Datum> {
        let text = serde_json::to_string(&self.0).ok()?;
        // JSON text holds no NUL byte: serde_json writes U+0000 as \u0000.
        let c = CString::new(to_db(&text).into_owned()).ok()?;
        // SAFETY: jsonb_in of a C string valid for the call; it copies what it keeps.
        unsafe { direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(Datum::from(c.as_ptr()))]) }
    }

    fn type_oid() -> Oid {
        pg_sys::JSONBOID
    }
}

macro_rules! db_value_abi {
    ($t:ty, $sql:literal) => {
        // SAFETY: returns the datum into_datum made (fresh), or NULL, as pgrx's own
        // text and jsonb results do.
        unsafe impl BoxRet for $t {
            unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
                match self.into_datum() {
                    // SAFETY: a valid datum of the function's result type.
                    Some(d) => unsafe { fcinfo.return_raw_datum(d) },
                    None => fcinfo.return_null(),
                }
            }
        }

        // SAFETY: an argument is read with from_datum, as pgrx's own types are.
        unsafe impl<'fcx> ArgAbi<'fcx> for $t {
            unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
                let index = arg.index();
                // SAFETY: the argument is of the declared SQL type.
                unsafe { arg.unbox_arg_using_from_datum() }
                    .unwrap_or_else(|| pgrx::error!("argument {index} must not be null"))
            }

            unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
                // SAFETY: as above.
                unsafe { arg.unbox_arg_using_from_datum() }.into()
            }
        }

        impl_sql_translatable!($t, $sql);
    };
}

db_value_abi!(DbText, "text");
db_value_abi!(DbJson, "jsonb");

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
