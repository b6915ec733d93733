//! Row encoding on the hot path: datums become jsonb through PostgreSQL's own
//! `jsonb_build_object`/`jsonb_build_array` (the same per-type rules as `to_jsonb(row)`),
//! called directly with a synthesized expression so it knows each argument's type.

use std::ffi::CStr;

use pgrx::pg_sys::{self, Datum, Oid};

/// One value to encode: its column name, datum and type.
pub struct Item<'a> {
    pub key: &'a CStr,
    pub value: Datum,
    pub isnull: bool,
    pub typid: Oid,
}

/// Function info for a variadic-"any" jsonb builder called with arguments of
/// `types`: those builders read their argument types from the call expression,
/// so a synthesized one (NULL constants of each type) is attached. The expression
/// is built in CurrentMemoryContext, the function info in `cxt`.
///
/// # Safety
/// Must run inside a transaction (fmgr lookup).
unsafe fn variadic_flinfo(
    func_oid: u32,
    types: impl Iterator<Item = Oid>,
    cxt: pg_sys::MemoryContext,
) -> *mut pg_sys::FmgrInfo {
    // SAFETY: fresh palloc'd nodes, initialised before use.
    unsafe {
        let mut exprs: *mut pg_sys::List = std::ptr::null_mut();
        for typid in types {
            exprs =
                pg_sys::lappend(exprs, pg_sys::makeNullConst(typid, -1, pg_sys::InvalidOid).cast());
        }
        let expr = pg_sys::makeFuncExpr(
            func_oid.into(),
            pg_sys::JSONBOID,
            exprs,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
        );
        let flinfo = pg_sys::MemoryContextAllocZero(cxt, std::mem::size_of::<pg_sys::FmgrInfo>())
            as *mut pg_sys::FmgrInfo;
        pg_sys::fmgr_info_cxt(func_oid.into(), flinfo, cxt);
        (*flinfo).fn_expr = expr.cast();
        flinfo
    }
}

/// Calls `func` through `flinfo` with the `nargs` arguments `args`, as fmgr.h's InitFunctionCallInfoData sets a call up.
///
/// # Safety
/// The arguments must match the types `flinfo` was made for; allocates in CurrentMemoryContext.
unsafe fn call_with(
    flinfo: *mut pg_sys::FmgrInfo,
    func: unsafe fn(pg_sys::FunctionCallInfo) -> Datum,
    nargs: usize,
    args: impl Iterator<Item = pg_sys::NullableDatum>,
) -> Datum {
    // SAFETY: a zeroed call info of the right size, every argument set below.
    unsafe {
        let size = std::mem::size_of::<pg_sys::FunctionCallInfoBaseData>()
            + nargs * std::mem::size_of::<pg_sys::NullableDatum>();
        let fcinfo = pg_sys::palloc0(size) as pg_sys::FunctionCallInfo;
        (*fcinfo).flinfo = flinfo;
        (*fcinfo).fncollation = pg_sys::InvalidOid;
        (*fcinfo).nargs = nargs as i16;
        for (slot, arg) in (*fcinfo).args.as_mut_slice(nargs).iter_mut().zip(args) {
            *slot = arg;
        }
        func(fcinfo)
    }
}

/// Call a variadic-"any" jsonb builder (`jsonb_build_object` or `jsonb_build_array`) once.
///
/// # Safety
/// Datums must be valid for their type oids; allocates in CurrentMemoryContext.
unsafe fn call_variadic(
    func_oid: u32,
    func: unsafe fn(pg_sys::FunctionCallInfo) -> Datum,
    args: &[(Datum, bool, Oid)],
) -> Datum {
    // SAFETY: forwarded; the function info lives in the current context like the result.
    unsafe {
        let flinfo =
            variadic_flinfo(func_oid, args.iter().map(|a| a.2), pg_sys::CurrentMemoryContext);
        call_with(
            flinfo,
            func,
            args.len(),
            args.iter().map(|&(value, isnull, _)| pg_sys::NullableDatum { value, isnull }),
        )
    }
}

/// `jsonb_build_object` prepared once for a fixed list of keys and types: the
/// call's expression, function info and key datums live in their own memory
/// context, so encoding a whole row allocates only the result.
///
/// The arguments go in jsonb's own key order (shorter keys first, then
/// bytewise), so the sort that every jsonb object ends with finds them already
/// sorted: one pass instead of a full qsort per row.
pub struct ObjectBuilder {
    cxt: pg_sys::MemoryContext,
    flinfo: *mut pg_sys::FmgrInfo,
    keys: Vec<Datum>,
    /// For each argument pair, in jsonb key order: the index of its value in `build`'s input.
    order: Vec<usize>,
    /// When every value's type has a fixed rule (see [`Kind`]): the values'
    /// kinds, in jsonb key order, for [`ObjectBuilder::build_direct`].
    direct: Option<Vec<Kind>>,
}

/// How a value of one type becomes jsonb, exactly as `to_jsonb` (datum_to_jsonb)
/// makes it, for the types whose rule needs no lookup at each call:
/// `jsonb_build_object` looks up every argument's type category, and writes
/// integers and numerics as text and parses them again, for every row.
#[derive(Clone, Copy)]
enum Kind {
    /// text, varchar, bpchar: a string of the value's bytes (their output
    /// functions return exactly those bytes).
    Text,
    /// int2, int4, int8: the number, as numeric_in would read its output.
    Int2,
    Int4,
    Int8,
    /// numeric: the value itself; NaN and the infinities as strings, as their
    /// output contains an "n" (datum_to_jsonb's test).
    Numeric,
    Bool,
    /// date, timestamp, timestamptz: JsonEncodeDateTime's string.
    DateTime(Oid),
    /// Any other built-in scalar type (uuid, interval, inet, bytea, ...): a
    /// string of its output function's result, which is built-in code.
    Output(*mut pg_sys::FmgrInfo),
}

/// The [`Kind`] of type `typid`, or None when `to_jsonb`'s rule for it needs the
/// general path: floats (their output decides), json and jsonb (embedded),
/// arrays and composites (recursive), and every type or domain made by a user
/// (it may have a cast to json, and its output is user code).
///
/// # Safety
/// Must run inside a transaction (syscache lookups); `cxt` lives as long as the kind.
unsafe fn kind_of(typid: Oid, cxt: pg_sys::MemoryContext) -> Option<Kind> {
    Some(match typid {
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => Kind::Text,
        pg_sys::INT2OID => Kind::Int2,
        pg_sys::INT4OID => Kind::Int4,
        pg_sys::INT8OID => Kind::Int8,
        pg_sys::NUMERICOID => Kind::Numeric,
        pg_sys::BOOLOID => Kind::Bool,
        pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => Kind::DateTime(typid),
        pg_sys::FLOAT4OID | pg_sys::FLOAT8OID | pg_sys::JSONOID | pg_sys::JSONBOID => return None,
        pg_sys::ANYARRAYOID | pg_sys::ANYCOMPATIBLEARRAYOID | pg_sys::RECORDARRAYOID => {
            return None
        }
        t if u32::from(t) >= pg_sys::FirstNormalObjectId => return None,
        t => {
            // SAFETY: syscache lookups of an existing type (the caller's contract).
            unsafe {
                if pg_sys::get_element_type(t) != pg_sys::InvalidOid || pg_sys::type_is_rowtype(t) {
                    return None;
                }
                let (mut out, mut varlena) = (pg_sys::InvalidOid, false);
                pg_sys::getTypeOutputInfo(t, &mut out, &mut varlena);
                let flinfo =
                    pg_sys::MemoryContextAllocZero(cxt, std::mem::size_of::<pg_sys::FmgrInfo>())
                        as *mut pg_sys::FmgrInfo;
                pg_sys::fmgr_info_cxt(out, flinfo, cxt);
                Kind::Output(flinfo)
            }
        }
    })
}

/// The calls of one row's direct build, declared without pgrx's guard, which
/// costs a sigsetjmp and a thread check per call (an eighth of verify_table's
/// time, at a dozen calls a row): [`ObjectBuilder::build_direct`] makes them all
/// under one guard per row. An ERROR in one of them (out of memory, a value too
/// big) longjmps to that guard across build_direct and [`value_of`], which is
/// sound because those frames own nothing to drop: raw pointers and Copy values.
mod raw {
    use pgrx::pg_sys::{
        varlena, Datum, FmgrInfo, Jsonb, JsonbIteratorToken, JsonbParseState, JsonbValue, Numeric,
        Oid,
    };
    use std::ffi::{c_char, c_int};

    unsafe extern "C-unwind" {
        pub fn pushJsonbValue(
            pstate: *mut *mut JsonbParseState,
            seq: JsonbIteratorToken::Type,
            jbval: *mut JsonbValue,
        ) -> *mut JsonbValue;
        pub fn JsonbValueToJsonb(val: *mut JsonbValue) -> *mut Jsonb;
        pub fn int64_to_numeric(val: i64) -> Numeric;
        pub fn pg_detoast_datum(datum: *mut varlena) -> *mut varlena;
        pub fn pg_detoast_datum_packed(datum: *mut varlena) -> *mut varlena;
        pub fn numeric_is_nan(num: Numeric) -> bool;
        pub fn numeric_is_inf(num: Numeric) -> bool;
        pub fn JsonEncodeDateTime(
            buf: *mut c_char,
            value: Datum,
            typid: Oid,
            tzp: *const c_int,
        ) -> *mut c_char;
        pub fn OutputFunctionCall(flinfo: *mut FmgrInfo, val: Datum) -> *mut c_char;
    }
}

/// A jsonb string value of `len` bytes at `p`, or None when it is longer than a
/// jsonb string may be (the general path then raises PostgreSQL's own error).
fn string_value(p: *const std::ffi::c_char, len: usize) -> Option<pg_sys::JsonbValue> {
    if len > pg_sys::JENTRY_OFFLENMASK as usize {
        return None;
    }
    let mut v = pg_sys::JsonbValue { type_: pg_sys::jbvType::jbvString, val: no_val() };
    v.val.string =
        pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 { len: len as i32, val: p.cast_mut() };
    Some(v)
}

fn no_val() -> pg_sys::JsonbValue__bindgen_ty_1 {
    pg_sys::JsonbValue__bindgen_ty_1 { boolean: false }
}

/// The jsonb value of one non-null datum of kind `k`, built in the current
/// memory context; None to take the general path.
///
/// # Safety
/// `d` must be a valid, non-null datum of a type of kind `k`. Must run under a
/// PostgreSQL error guard (it calls [`raw`] functions).
unsafe fn value_of(k: Kind, d: Datum) -> Option<pg_sys::JsonbValue> {
    let numeric = |n: pg_sys::Numeric| {
        let mut v = pg_sys::JsonbValue { type_: pg_sys::jbvType::jbvNumeric, val: no_val() };
        v.val.numeric = n;
        v
    };
    // SAFETY: d is a valid datum of its kind's type (the caller's contract); the
    // detoasted copies and fresh values live in the current context, which
    // outlives the object being built. The raw calls run under build_direct's
    // guard (the caller's contract); numeric_out, for the rare NaN, has its own.
    unsafe {
        match k {
            Kind::Text => {
                let p = raw::pg_detoast_datum_packed(d.cast_mut_ptr());
                string_value(pgrx::varlena::vardata_any(p), pgrx::varlena::varsize_any_exhdr(p))
            }
            Kind::Int2 => Some(numeric(raw::int64_to_numeric(i64::from(d.value() as i16)))),
            Kind::Int4 => Some(numeric(raw::int64_to_numeric(i64::from(d.value() as i32)))),
            Kind::Int8 => Some(numeric(raw::int64_to_numeric(d.value() as i64))),
            Kind::Numeric => {
                // A plain (4-byte header) copy, as numeric_in would make: jsonb
                // stores a numeric's bytes as they are.
                let n = raw::pg_detoast_datum(d.cast_mut_ptr()) as pg_sys::Numeric;
                if raw::numeric_is_nan(n) || raw::numeric_is_inf(n) {
                    let s = pgrx::direct_function_call_as_datum(pg_sys::numeric_out, &[Some(d)])?;
                    let s = s.cast_mut_ptr::<std::ffi::c_char>();
                    string_value(s, std::ffi::CStr::from_ptr(s).to_bytes().len())
                } else {
                    Some(numeric(n))
                }
            }
            Kind::Bool => {
                let mut v = pg_sys::JsonbValue { type_: pg_sys::jbvType::jbvBool, val: no_val() };
                v.val.boolean = d.value() != 0;
                Some(v)
            }
            Kind::DateTime(t) => {
                let s = raw::JsonEncodeDateTime(std::ptr::null_mut(), d, t, std::ptr::null());
                string_value(s, std::ffi::CStr::from_ptr(s).to_bytes().len())
            }
            Kind::Output(flinfo) => {
                let s = raw::OutputFunctionCall(flinfo, d);
                string_value(s, std::ffi::CStr::from_ptr(s).to_bytes().len())
            }
        }
    }
}

impl ObjectBuilder {
    /// # Safety
    /// Must run inside a transaction (fmgr lookups); `keys` and `types` have equal length.
    pub unsafe fn new(keys: &[&CStr], types: &[Oid]) -> ObjectBuilder {
        // SAFETY: a fresh context under CacheMemoryContext, deleted by Drop; every
        // allocation below happens in it and is initialised before use.
        unsafe {
            let cxt = pg_sys::AllocSetContextCreateExtended(
                pg_sys::CacheMemoryContext,
                c"audit_ext row encoder".as_ptr(),
                pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            let old = pg_sys::MemoryContextSwitchTo(cxt);
            let mut order: Vec<usize> = (0..keys.len()).collect();
            order.sort_by_key(|&i| jsonb_key_order(keys[i]));
            let key_datums: Vec<Datum> =
                order.iter().map(|&i| crate::datum::text_datum(keys[i].to_bytes())).collect();
            let arg_types = order.iter().flat_map(|&i| [pg_sys::TEXTOID, types[i]]);
            let flinfo = variadic_flinfo(pg_sys::F_JSONB_BUILD_OBJECT_ANY, arg_types, cxt);
            let direct = order.iter().map(|&i| kind_of(types[i], cxt)).collect::<Option<Vec<_>>>();
            pg_sys::MemoryContextSwitchTo(old);
            ObjectBuilder { cxt, flinfo, keys: key_datums, order, direct }
        }
    }

    /// The object of `values` (datum, isnull), one per key, in the order `new` was given the keys.
    ///
    /// # Safety
    /// Each non-null datum must be valid for its key's type; allocates in CurrentMemoryContext.
    pub unsafe fn build(&self, values: &[(Datum, bool)]) -> Datum {
        debug_assert_eq!(values.len(), self.keys.len());
        if values.is_empty() {
            // SAFETY: a static, valid JSON literal.
            return unsafe { jsonb_from_str(c"{}") };
        }
        if let Some(direct) = &self.direct {
            // SAFETY: forwarded from the caller.
            if let Some(d) = unsafe { self.build_direct(direct, values) } {
                return d;
            }
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.build_general(values) }
    }

    /// The object built value by value as `to_jsonb` builds it, without
    /// jsonb_build_object's lookups; None when a value needs the general path.
    ///
    /// # Safety
    /// As [`ObjectBuilder::build`].
    unsafe fn build_direct(&self, kinds: &[Kind], values: &[(Datum, bool)]) -> Option<Datum> {
        // SAFETY: the parse state is built in the current context; every value
        // pushed points to memory that outlives JsonbValueToJsonb (the keys are
        // self's text datums, the values' bytes the caller's datums or fresh copies).
        // One guard for the row's raw calls; the closure owns nothing to drop (see raw).
        unsafe {
            pg_sys::ffi::pg_guard_ffi_boundary(|| {
                let mut state: *mut pg_sys::JsonbParseState = std::ptr::null_mut();
                raw::pushJsonbValue(
                    &mut state,
                    pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT,
                    std::ptr::null_mut(),
                );
                for ((&key, kind), &i) in self.keys.iter().zip(kinds).zip(&self.order) {
                    let key = key.cast_mut_ptr::<pg_sys::varlena>();
                    let mut k = string_value(
                        pgrx::varlena::vardata_any(key),
                        pgrx::varlena::varsize_any_exhdr(key),
                    )?;
                    raw::pushJsonbValue(&mut state, pg_sys::JsonbIteratorToken::WJB_KEY, &mut k);
                    let (d, isnull) = values[i];
                    let mut v = if isnull {
                        pg_sys::JsonbValue { type_: pg_sys::jbvType::jbvNull, val: no_val() }
                    } else {
                        value_of(*kind, d)?
                    };
                    raw::pushJsonbValue(&mut state, pg_sys::JsonbIteratorToken::WJB_VALUE, &mut v);
                }
                let res = raw::pushJsonbValue(
                    &mut state,
                    pg_sys::JsonbIteratorToken::WJB_END_OBJECT,
                    std::ptr::null_mut(),
                );
                Some(Datum::from(raw::JsonbValueToJsonb(res)))
            })
        }
    }

    /// # Safety
    /// As [`ObjectBuilder::build`].
    unsafe fn build_general(&self, values: &[(Datum, bool)]) -> Datum {
        let args = self.keys.iter().zip(&self.order).flat_map(|(&key, &i)| {
            let (value, isnull) = values[i];
            [
                pg_sys::NullableDatum { value: key, isnull: false },
                pg_sys::NullableDatum { value, isnull },
            ]
        });
        // SAFETY: keys are text and values follow the types new() was given.
        unsafe { call_with(self.flinfo, pg_sys::jsonb_build_object, values.len() * 2, args) }
    }
}

/// jsonb's key order (lengthCompareJsonbStringValue): by length, then bytewise.
fn jsonb_key_order(k: &CStr) -> (usize, &[u8]) {
    (k.to_bytes().len(), k.to_bytes())
}

impl Drop for ObjectBuilder {
    fn drop(&mut self) {
        // SAFETY: the context was created in new() and is deleted once.
        unsafe { pg_sys::MemoryContextDelete(self.cxt) };
    }
}

/// A jsonb array of the values (used for composite keys).
///
/// # Safety
/// See [`call_variadic`].
pub unsafe fn jsonb_array(values: &[(Datum, bool, Oid)]) -> Datum {
    // SAFETY: forwarded.
    unsafe { call_variadic(pg_sys::F_JSONB_BUILD_ARRAY_ANY, pg_sys::jsonb_build_array, values) }
}

/// # Safety
/// `s` must be valid JSON.
pub unsafe fn jsonb_from_str(s: &CStr) -> Datum {
    // SAFETY: jsonb_in takes a cstring datum.
    unsafe {
        pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(Datum::from(s.as_ptr()))])
            .expect("jsonb_in never returns NULL")
    }
}

/// Binary ("image") equality of two non-null datums, as datum_image_eq does:
/// compares bytes after detoasting, so an unchanged TOAST value is equal to itself
/// without being fetched.
///
/// # Safety
/// Both datums must be valid, non-null values of a type with this length and byval.
pub unsafe fn image_eq(a: Datum, b: Datum, typlen: i16, byval: bool) -> bool {
    if byval {
        return a == b;
    }
    // SAFETY: by-reference datums point to valid memory of the type's layout.
    unsafe {
        match typlen {
            -1 => {
                let pa: *mut pg_sys::varlena = a.cast_mut_ptr();
                let pb: *mut pg_sys::varlena = b.cast_mut_ptr();
                let (ra, rb) = (raw_varlena(pa), raw_varlena(pb));
                if ra == rb {
                    return true; // same bytes, including identical TOAST pointers
                }
                let da = pg_sys::pg_detoast_datum_packed(pa);
                let db = pg_sys::pg_detoast_datum_packed(pb);
                let eq = payload(da) == payload(db);
                if da != pa {
                    pg_sys::pfree(da.cast());
                }
                if db != pb {
                    pg_sys::pfree(db.cast());
                }
                eq
            }
            -2 => CStr::from_ptr(a.cast_mut_ptr()) == CStr::from_ptr(b.cast_mut_ptr()),
            n => {
                let n = n as usize;
                std::slice::from_raw_parts(a.cast_mut_ptr::<u8>(), n)
                    == std::slice::from_raw_parts(b.cast_mut_ptr::<u8>(), n)
            }
        }
    }
}

/// The whole varlena as stored (header included), whatever its form.
///
/// # Safety
/// `p` must point to a valid varlena.
unsafe fn raw_varlena<'a>(p: *mut pg_sys::varlena) -> &'a [u8] {
    // SAFETY: varsize_any reads the header of any varlena form.
    unsafe { std::slice::from_raw_parts(p as *const u8, pgrx::varlena::varsize_any(p)) }
}

/// The payload of a detoasted (possibly short-header) varlena.
///
/// # Safety
/// `p` must be a detoasted varlena.
unsafe fn payload<'a>(p: *mut pg_sys::varlena) -> &'a [u8] {
    // SAFETY: not external or compressed after pg_detoast_datum_packed.
    unsafe {
        std::slice::from_raw_parts(
            pgrx::varlena::vardata_any(p) as *const u8,
            pgrx::varlena::varsize_any_exhdr(p),
        )
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use std::ffi::CString;

    use pgrx::pg_sys::{self, Datum, Oid};
    use pgrx::prelude::*;

    use super::ObjectBuilder;
    use crate::live_rows::{Cursor, FreshSnapshot};

    fn bytes(d: Datum) -> Vec<u8> {
        let p = d.cast_mut_ptr::<pg_sys::varlena>();
        // SAFETY: a fresh, plain jsonb varlena.
        unsafe {
            std::slice::from_raw_parts(p as *const u8, pgrx::varlena::varsize_any(p)).to_vec()
        }
    }

    /// Every value of every type the direct builder takes comes out as the very
    /// bytes jsonb_build_object (to_jsonb's rules) makes of it: extremes, scales,
    /// NaN and the infinities, time zones, non-ASCII and escaped text, NULLs.
    #[pg_test]
    fn the_direct_builder_makes_the_bytes_jsonb_build_object_makes() {
        Spi::run(
            "SET TimeZone = 'Asia/Kolkata';
             CREATE TABLE kinds (t text, v varchar(10), c char(6), i2 int2, i4 int4, i8 int8, n numeric,
                 n2 numeric(12,2), b bool, d date, ts timestamp, tz timestamptz, u uuid, iv interval,
                 by bytea, ip inet, nm name, tm time, ch \"char\", o oid);
             INSERT INTO kinds VALUES
               ('', '', '', 0, 0, 0, 0, 0, false, '2024-02-29', '2024-02-29 12:34:56.789', '2024-02-29 12:34:56.789+00',
                'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '1 year 2 mons -3 days 04:05:06.7', '', '10.0.0.1/8', 'n', '23:59:59.999999', 'x', 0),
               ('é\"\\\\\n\t\u{1}ü€𝄞', 'ab', 'ab', -32768, -2147483648, -9223372036854775808, -0.00000000000000000001,
                -1234567890.12, true, '-infinity', 'infinity', '4713-01-01 BC 00:00+00', NULL, '-178000000 years', '\\x00ff',
                '::1', '', '00:00', '', 4294967295),
               (repeat('x', 3000), NULL, NULL, 32767, 2147483647, 9223372036854775807, 'NaN', 1.5, NULL, 'infinity',
                '-infinity', 'infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
               (NULL, 'z', 'z', NULL, NULL, NULL, 'Infinity', -0.5, NULL, NULL, NULL, '-infinity', NULL, NULL, NULL,
                NULL, NULL, NULL, NULL, NULL),
               (NULL, NULL, NULL, NULL, NULL, NULL, '-Infinity', NULL, NULL, '0001-01-01', '294276-12-31 23:59:59.999999',
                '1999-12-31 23:59:59.5-11:30', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
               (NULL, NULL, NULL, NULL, NULL, NULL, 123456789012345678901234567890.123456789012345678901234567890,
                0.10, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
               (NULL, NULL, NULL, NULL, NULL, NULL, 1000000, 100, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                NULL, NULL, NULL);",
        )
        .unwrap();
        let (names, types): (Vec<CString>, Vec<Oid>) = Spi::connect(|c| {
            c.select(
                "SELECT attname::text, atttypid FROM pg_attribute
                  WHERE attrelid = 'kinds'::regclass AND attnum > 0 ORDER BY attnum",
                None,
                &[],
            )
            .unwrap()
            .map(|r| {
                (
                    CString::new(r.get::<String>(1).unwrap().unwrap()).unwrap(),
                    r.get::<Oid>(2).unwrap().unwrap(),
                )
            })
            .unzip()
        });
        let keys: Vec<&std::ffi::CStr> = names.iter().map(|n| n.as_c_str()).collect();
        // SAFETY: inside a transaction; keys and types have equal length.
        let b = unsafe { ObjectBuilder::new(&keys, &types) };
        let direct = b.direct.as_ref().expect("every column's type has a direct rule");
        let mut rows = 0;
        Spi::connect(|_| {
            // A snapshot that sees this transaction's INSERT (a read-only cursor
            // runs on the active one, taken before it).
            let _s = FreshSnapshot::take();
            let mut cur = Cursor::open("SELECT * FROM kinds", &[]).unwrap();
            cur.push(100, &mut |v, n| {
                let values: Vec<(Datum, bool)> =
                    v.iter().copied().zip(n.iter().copied()).take(keys.len()).collect();
                // SAFETY: the values are of the builder's types, in its key order.
                let (fast, general) = unsafe {
                    (
                        b.build_direct(direct, &values).expect("no value needs the general path"),
                        b.build_general(&values),
                    )
                };
                assert_eq!(bytes(fast), bytes(general), "row {rows}");
                rows += 1;
                Ok(())
            })
            .unwrap();
        });
        assert_eq!(rows, 7);
        // Types without a fixed rule take the general path.
        for t in [pg_sys::FLOAT8OID, pg_sys::JSONBOID, pg_sys::INT4ARRAYOID, pg_sys::JSONOID] {
            // SAFETY: as above.
            let b = unsafe { ObjectBuilder::new(&[c"k"], &[t]) };
            assert!(b.direct.is_none());
        }
        let domain = Spi::get_one::<Oid>("CREATE DOMAIN dint AS int; SELECT 'dint'::regtype::oid")
            .unwrap()
            .unwrap();
        // SAFETY: as above.
        assert!(unsafe { ObjectBuilder::new(&[c"k"], &[domain]) }.direct.is_none());
    }
}
