//! jsonb_out's text, written from jsonb's on-disk format without the iterator,
//! StringInfo and per-character escaping PostgreSQL uses. The format it follows
//! is JsonbToCString's without indentation: `{"k": v, "k2": [1, 2]}`, a raw
//! scalar as itself, strings as escape_json writes them, numbers as numeric_out does.
//! Anything unexpected (an unknown entry type, bounds that do not add up, deep
//! nesting, a NUL byte) returns None, and the caller uses JsonbToCString instead.

use std::ffi::{c_char, CStr};

use pgrx::pg_sys;

const JB_CMASK: u32 = 0x0FFF_FFFF;
const JB_FSCALAR: u32 = 0x1000_0000;
const JB_FOBJECT: u32 = 0x2000_0000;
const JB_FARRAY: u32 = 0x4000_0000;
const JENTRY_OFFLENMASK: u32 = 0x0FFF_FFFF;
const JENTRY_TYPEMASK: u32 = 0x7000_0000;
const JENTRY_HAS_OFF: u32 = 0x8000_0000;
const JENTRY_ISSTRING: u32 = 0x0000_0000;
const JENTRY_ISNUMERIC: u32 = 0x1000_0000;
const JENTRY_ISBOOL_FALSE: u32 = 0x2000_0000;
const JENTRY_ISBOOL_TRUE: u32 = 0x3000_0000;
const JENTRY_ISNULL: u32 = 0x4000_0000;
const JENTRY_ISCONTAINER: u32 = 0x5000_0000;
/// Deeper values go to JsonbToCString, which does not recurse.
const MAX_DEPTH: u32 = 64;

/// Appends the text of the root container `c` to `out`.
pub fn write(out: &mut Vec<u8>, c: &[u8]) -> Option<()> {
    if cfg!(target_endian = "big") {
        return None;
    }
    container(out, c, 0, true)
}

fn u32_at(c: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(c.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn intalign(x: usize) -> usize {
    (x + 3) & !3
}

/// A container's children: their entries and where each one's data starts and ends.
struct Children<'a> {
    c: &'a [u8],
    n: usize,
    data: usize,
}

impl Children<'_> {
    fn entry(&self, i: usize) -> Option<u32> {
        if i >= self.n {
            return None;
        }
        u32_at(self.c, 4 + 4 * i)
    }
    /// Start of child i's data, relative to the data area (getJsonbOffset).
    fn start(&self, i: usize) -> Option<usize> {
        let mut off = 0usize;
        let mut k = i;
        while k > 0 {
            k -= 1;
            let e = self.entry(k)?;
            off = off.checked_add((e & JENTRY_OFFLENMASK) as usize)?;
            if e & JENTRY_HAS_OFF != 0 {
                break;
            }
        }
        Some(off)
    }
    /// Child i's bytes from `start`, given that its data starts there.
    fn end(&self, i: usize, start: usize) -> Option<usize> {
        let e = self.entry(i)?;
        let f = (e & JENTRY_OFFLENMASK) as usize;
        let end = if e & JENTRY_HAS_OFF != 0 { f } else { start.checked_add(f)? };
        (end >= start && self.data.checked_add(end)? <= self.c.len()).then_some(end)
    }
    fn bytes(&self, from: usize, to: usize) -> Option<&[u8]> {
        self.c.get(self.data + from..self.data + to)
    }
}

fn container(out: &mut Vec<u8>, c: &[u8], depth: u32, top: bool) -> Option<()> {
    if depth > MAX_DEPTH {
        return None;
    }
    let header = u32_at(c, 0)?;
    let count = (header & JB_CMASK) as usize;
    let object = header & JB_FOBJECT != 0;
    let array = header & JB_FARRAY != 0;
    let scalar = header & JB_FSCALAR != 0;
    if object == array || (scalar && !(array && top && count == 1)) {
        return None;
    }
    let n = if object { count.checked_mul(2)? } else { count };
    let data = n.checked_mul(4)?.checked_add(4)?;
    if data > c.len() {
        return None;
    }
    let ch = Children { c, n, data };
    if scalar {
        let end = ch.end(0, 0)?;
        return value(out, &ch, 0, 0, end, depth);
    }
    if object {
        out.push(b'{');
        let mut ks = 0usize;
        let mut vs = ch.start(count)?;
        for i in 0..count {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            let ke = ch.end(i, ks)?;
            if ch.entry(i)? & JENTRY_TYPEMASK != JENTRY_ISSTRING {
                return None;
            }
            escape(out, ch.bytes(ks, ke)?)?;
            out.extend_from_slice(b": ");
            let ve = ch.end(count + i, vs)?;
            value(out, &ch, count + i, vs, ve, depth)?;
            ks = ke;
            vs = ve;
        }
        out.push(b'}');
    } else {
        out.push(b'[');
        let mut s = 0usize;
        for i in 0..count {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            let e = ch.end(i, s)?;
            value(out, &ch, i, s, e, depth)?;
            s = e;
        }
        out.push(b']');
    }
    Some(())
}

fn value(
    out: &mut Vec<u8>,
    ch: &Children<'_>,
    i: usize,
    start: usize,
    end: usize,
    depth: u32,
) -> Option<()> {
    match ch.entry(i)? & JENTRY_TYPEMASK {
        JENTRY_ISSTRING => escape(out, ch.bytes(start, end)?),
        JENTRY_ISNUMERIC => numeric(out, ch.bytes(intalign(start).min(end), end)?),
        JENTRY_ISBOOL_FALSE => {
            out.extend_from_slice(b"false");
            Some(())
        }
        JENTRY_ISBOOL_TRUE => {
            out.extend_from_slice(b"true");
            Some(())
        }
        JENTRY_ISNULL => {
            out.extend_from_slice(b"null");
            Some(())
        }
        JENTRY_ISCONTAINER => {
            container(out, ch.bytes(intalign(start).min(end), end)?, depth + 1, false)
        }
        _ => None,
    }
}

/// escape_json: quotes, and \b \f \n \r \t \" \\ or \u00xx for the other control bytes.
fn escape(out: &mut Vec<u8>, s: &[u8]) -> Option<()> {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut from = 0;
    let mut i = 0;
    while i < s.len() {
        // Most strings need no escaping: skip eight plain bytes at a time.
        if let Some(w) = s.get(i..i + 8) {
            if !needs_escape(u64::from_le_bytes(w.try_into().ok()?)) {
                i += 8;
                continue;
            }
        }
        let b = s[i];
        i += 1;
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        let i = i - 1;
        out.extend_from_slice(&s[from..i]);
        from = i + 1;
        if b == 0 {
            return None; // PostgreSQL would stop the string there
        }
        escape_byte(out, b);
    }
    out.extend_from_slice(&s[from..]);
    out.push(b'"');
    Some(())
}

/// One byte as escape_json writes it: \b \f \n \r \t \" \\ or \u00xx for the other
/// control bytes, any other byte as itself.
fn escape_byte(out: &mut Vec<u8>, b: u8) {
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0..0x20 => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ]);
        }
        _ => out.push(b),
    }
}

/// Whether any of the eight bytes is a control byte, `"` or `\\` (bit tricks
/// from "Bit Twiddling Hacks": a byte below n, a byte equal to n). May say
/// true for a plain word (then the bytes are checked one by one), never false
/// for one that needs escaping.
fn needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    below_space | zero_in(w ^ (ONES * b'"' as u64)) | zero_in(w ^ (ONES * b'\\' as u64)) != 0
}

/// numeric_out's text of the numeric varlena at the start of `b` (as jsonb stores it).
fn numeric(out: &mut Vec<u8>, b: &[u8]) -> Option<()> {
    let first = *b.first()?;
    let size = if first & 1 == 1 {
        if first == 1 {
            return None; // an external pointer: never inside a jsonb
        }
        (first >> 1) as usize
    } else {
        let h = u32_at(b, 0)?;
        if h & 2 != 0 {
            return None; // compressed: never inside a jsonb
        }
        (h >> 2) as usize
    };
    if size < 1 || size > b.len() {
        return None;
    }
    let header = if first & 1 == 1 { 1 } else { 4 };
    numeric_text(out, b.get(header..size)?)
}

/// numeric_out's text (get_str_from_var) of a finite numeric, from its bytes
/// after the varlena header: base-10000 digits after a short or long header.
/// NaN and infinities (never in jsonb) and anything malformed return None.
fn numeric_text(out: &mut Vec<u8>, n: &[u8]) -> Option<()> {
    let h = u16::from_ne_bytes(n.get(0..2)?.try_into().ok()?);
    let (neg, dscale, weight, at) = match h & 0xC000 {
        0xC000 => return None,
        0x8000 => {
            let w = (h & 0x003F) as i32;
            (
                h & 0x2000 != 0,
                ((h & 0x1F80) >> 7) as i32,
                if h & 0x0040 != 0 { w - 64 } else { w },
                2,
            )
        }
        sign => (
            sign == 0x4000,
            (h & 0x3FFF) as i32,
            i16::from_ne_bytes(n.get(2..4)?.try_into().ok()?) as i32,
            4,
        ),
    };
    let raw = n.get(at..)?;
    if raw.len() % 2 != 0 {
        return None;
    }
    let ndigits = raw.len() / 2;
    let at = |i: usize| i16::from_ne_bytes([raw[2 * i], raw[2 * i + 1]]) as i32;
    if (0..ndigits).any(|i| !(0..10000).contains(&at(i))) {
        return None;
    }
    let digit = |d: i32| if d >= 0 && (d as usize) < ndigits { at(d as usize) } else { 0 };
    let four = |out: &mut Vec<u8>, dig: i32| {
        out.extend_from_slice(&[
            b'0' + (dig / 1000) as u8,
            b'0' + (dig / 100 % 10) as u8,
            b'0' + (dig / 10 % 10) as u8,
            b'0' + (dig % 10) as u8,
        ])
    };
    if neg {
        out.push(b'-');
    }
    let mut d;
    if weight < 0 {
        out.push(b'0');
        d = weight + 1;
    } else {
        // The first group without its leading zeros.
        let first = digit(0);
        let mut div = 1000;
        while div > 1 && first < div {
            div /= 10;
        }
        while div > 0 {
            out.push(b'0' + (first / div % 10) as u8);
            div /= 10;
        }
        d = 1;
        while d <= weight {
            four(out, digit(d));
            d += 1;
        }
    }
    if dscale > 0 {
        out.push(b'.');
        let end = out.len() + dscale as usize;
        let mut i = 0;
        while i < dscale {
            four(out, digit(d));
            d += 1;
            i += 4;
        }
        out.truncate(end);
    }
    Some(())
}

/// jsonb_out's text of the jsonb datum `d`, appended to `out`: [`write`], or
/// PostgreSQL's own `jsonb_out` for anything `write` does not handle. Debug
/// builds (the test suites) check every result against `jsonb_out`.
///
/// # Safety
/// `d` must be a valid, non-null jsonb datum; allocates in CurrentMemoryContext.
pub unsafe fn datum_text(d: pg_sys::Datum, out: &mut Vec<u8>) -> Result<(), String> {
    let start = out.len();
    // SAFETY: a jsonb datum is a varlena; unless it is plain (4-byte header, inline,
    // uncompressed), pg_detoast_datum returns such a copy. Its root container is the
    // VARSIZE - 4 bytes after the header.
    let (p, root) = unsafe {
        let mut p = d.cast_mut_ptr::<pg_sys::varlena>();
        if !pgrx::varlena::varatt_is_4b_u(p) {
            p = pg_sys::pg_detoast_datum(p);
        }
        let size = pgrx::varlena::varsize_4b(p);
        (p, std::slice::from_raw_parts(p.cast::<u8>().add(4), size.saturating_sub(4)))
    };
    let pg = || {
        // SAFETY: p is a plain jsonb varlena; jsonb_out returns a palloc'd C string.
        unsafe {
            let t = pgrx::direct_function_call_as_datum(
                pg_sys::jsonb_out,
                &[Some(pg_sys::Datum::from(p))],
            )
            .expect("jsonb_out never returns NULL");
            CStr::from_ptr(t.cast_mut_ptr::<c_char>())
        }
    };
    if write(out, root).is_none() {
        out.truncate(start); // write may have written part of it
        out.extend_from_slice(pg().to_bytes());
    } else if cfg!(debug_assertions) && &out[start..] != pg().to_bytes() {
        return Err(format!(
            "jsonb text differs from jsonb_out: {:?} vs {:?}",
            String::from_utf8_lossy(&out[start..]),
            pg().to_string_lossy()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{escape, escape_byte, needs_escape};
    use proptest::prelude::*;

    fn plain(b: u8) -> bool {
        b >= 0x20 && b != b'"' && b != b'\\'
    }

    #[test]
    fn word_check_agrees_with_the_byte_check() {
        for b in 0..=255u8 {
            for pos in 0..8 {
                for fill in [b'a', b' ', b'!', b'#', b'[', b']', 0x7f, 0x80, 0xa2, 0xdc, 0xff] {
                    let mut w = [fill; 8];
                    w[pos] = b;
                    assert_eq!(
                        needs_escape(u64::from_le_bytes(w)),
                        !w.iter().all(|&x| plain(x)),
                        "{w:?}"
                    );
                }
            }
        }
    }

    /// escape_json, one byte at a time: checks the word-at-a-time scan around it.
    fn reference(s: &[u8]) -> Vec<u8> {
        let mut out = vec![b'"'];
        for &b in s {
            escape_byte(&mut out, b);
        }
        out.push(b'"');
        out
    }

    proptest! {
        #[test]
        fn escape_matches_escape_json(s in proptest::collection::vec(prop_oneof![1u8..=0x21, Just(b'"'), Just(b'\\'), any::<u8>()], 0..40)) {
            prop_assume!(!s.contains(&0));
            let mut out = Vec::new();
            prop_assert!(escape(&mut out, &s).is_some());
            prop_assert_eq!(out, reference(&s));
        }
    }
}
