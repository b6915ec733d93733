//! Small datum builders shared by the capture and the log writer: text and
//! text[] values in the database encoding, and a type's text output.

use std::ffi::{c_char, CStr};

use pgrx::pg_sys::{self, Datum, Oid};

/// The type's text output of a datum, as `::text` gives it: bytes in the database encoding.
///
/// # Safety
/// `d` must be a valid, non-null datum of type `typid`.
pub unsafe fn output_bytes(d: Datum, typid: Oid) -> Vec<u8> {
    // SAFETY: standard output-function call sequence; the result is a palloc'd C string.
    unsafe {
        let mut func = pg_sys::InvalidOid;
        let mut varlena = false;
        pg_sys::getTypeOutputInfo(typid, &mut func, &mut varlena);
        CStr::from_ptr(pg_sys::OidOutputFunctionCall(func, d)).to_bytes().to_vec()
    }
}

/// A palloc'd varlena (text or bytea) holding `bytes`.
///
/// # Safety
/// Allocates in CurrentMemoryContext.
pub unsafe fn text_datum(bytes: &[u8]) -> Datum {
    // SAFETY: cstring_to_text_with_len copies exactly len bytes.
    unsafe {
        Datum::from(pg_sys::cstring_to_text_with_len(bytes.as_ptr().cast(), bytes.len() as i32))
    }
}

/// A text[] datum.
///
/// # Safety
/// Allocates in CurrentMemoryContext.
pub unsafe fn text_array(items: &[&CStr]) -> Datum {
    // SAFETY: construct_array copies the element datums; text is varlena, int-aligned.
    unsafe {
        let mut elems: Vec<Datum> = items.iter().map(|s| text_datum(s.to_bytes())).collect();
        let arr = pg_sys::construct_array(
            elems.as_mut_ptr(),
            elems.len() as i32,
            pg_sys::TEXTOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as c_char,
        );
        Datum::from(arr)
    }
}
