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
            pg_sys::MemoryContextSwitchTo(old);
            ObjectBuilder { cxt, flinfo, keys: key_datums, order }
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
