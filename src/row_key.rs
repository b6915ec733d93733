//! The row-key rule, in one place: a row's key is its table's primary key, else
//! its replica identity index (REPLICA IDENTITY USING INDEX); a table with
//! neither has no row key. The trigger writes row_id by this rule
//! (capture::cache), audit.track warns by it, and time travel and undo address
//! rows by it; were these to differ, lookups would miss rows the log holds.

use std::ffi::{CStr, CString};

use pgrx::pg_sys::{self, Oid};

/// One column of a row key.
pub struct KeyColumn {
    pub attnum: i32,
    pub name: CString,
    pub typid: Oid,
    pub typmod: i32,
}

impl KeyColumn {
    /// The column's SQL type with its modifier, as format_type prints it: a
    /// name that goes into SQL, so through crate::db_text::ident.
    pub fn sql_type(&self) -> crate::errors::Result<String> {
        // SAFETY: format_type_with_typemod returns a palloc'd C string for any type
        // oid that exists (the column's, while its relation is open).
        unsafe {
            crate::db_text::ident_ptr(pg_sys::format_type_with_typemod(self.typid, self.typmod))
        }
    }
}

/// The key columns of `rel`, in key order; empty when it has no key.
///
/// # Safety
/// `rel` must be an open relation.
pub unsafe fn columns(rel: pg_sys::Relation) -> Vec<KeyColumn> {
    // SAFETY: rel is open (caller's contract); the index is opened and closed here,
    // under a lock the relation's own lock already implies.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        let mut idx = pg_sys::RelationGetPrimaryKeyIndex(rel);
        #[cfg(feature = "pg18")]
        let mut idx = pg_sys::RelationGetPrimaryKeyIndex(rel, true);
        if idx == pg_sys::InvalidOid {
            idx = pg_sys::RelationGetReplicaIndex(rel);
        }
        if idx == pg_sys::InvalidOid {
            return vec![];
        }
        let irel = pg_sys::index_open(idx, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let form = (*irel).rd_index;
        let nkeys = (*form).indnkeyatts as usize;
        let attnums = (*form).indkey.values.as_slice(nkeys).to_vec();
        pg_sys::index_close(irel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let tupdesc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        attnums
            .into_iter()
            .filter(|&a| a > 0)
            .filter_map(|a| {
                let att = tupdesc.get(a as usize - 1)?;
                Some(KeyColumn {
                    attnum: a as i32,
                    name: CStr::from_ptr(att.attname.data.as_ptr()).to_owned(),
                    typid: att.atttypid,
                    typmod: att.atttypmod,
                })
            })
            .collect()
    }
}
