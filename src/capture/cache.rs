//! The trigger's per-backend cache of each tracked relation's configuration.
//! Entries are dropped by relcache (and schema) invalidation callbacks, so no
//! catalog is queried per row. The extension's own objects are crate::ext's.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;

use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgTupleDesc;

use crate::errors::Result;

pub struct Column {
    pub attnum: i32,
    pub name: CString,
    pub typid: Oid,
    pub typlen: i16,
    pub byval: bool,
    pub redacted: bool,
}

pub struct RelConfig {
    /// The tracked relation whose name the rows carry: this one, or the partitioned
    /// table it is a partition of. Its invalidation (a rename) drops this entry too.
    pub named: Oid,
    pub schema_name: CString,
    pub table_name: CString,
    /// Tracked columns in column order: not dropped, not excluded.
    pub columns: Vec<Column>,
    /// The row key (crate::row_key); empty if the table has none.
    pub key: Vec<crate::row_key::KeyColumn>,
    /// The output function of a one-column key: row_id is its text.
    pub key_output: Oid,
    /// `capture => 'changes'`: an UPDATE stores only its changed columns (crate::image).
    pub changes: bool,
    pub natts: usize,
    /// Encodes a whole row (redacted columns as their text markers).
    pub full_row: super::encode::ObjectBuilder,
    /// Encodes an UPDATE's changed columns: the builder for the last set of
    /// columns (as indexes into `columns`), which a bulk UPDATE repeats.
    pub changed: RefCell<Option<(Vec<usize>, Rc<super::encode::ObjectBuilder>)>>,
}

thread_local! {
    static RELS: RefCell<HashMap<Oid, Rc<RelConfig>>> = RefCell::new(HashMap::new());
    static FLUSH_ALL: Cell<bool> = const { Cell::new(false) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: Oid) {
    // Runs inside invalidation processing: no allocation-heavy or erroring work here.
    if relid == pg_sys::InvalidOid {
        FLUSH_ALL.with(|f| f.set(true));
        return;
    }
    RELS.with(|r| match r.try_borrow_mut() {
        Ok(mut m) => {
            // A partition's entry carries its tracked parent's name: renaming the parent
            // invalidates only the parent, so drop every entry named after it.
            m.retain(|k, c| *k != relid && c.named != relid);
        }
        Err(_) => FLUSH_ALL.with(|f| f.set(true)),
    });
}

/// A schema was renamed (or changed): the names the entries carry may be stale.
#[pg_guard]
unsafe extern "C-unwind" fn namespace_callback(
    _arg: pg_sys::Datum,
    _cacheid: i32,
    _hashvalue: u32,
) {
    FLUSH_ALL.with(|f| f.set(true));
}

fn ensure_registered() {
    if !REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: registers a static callback once per backend.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0));
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
                Some(namespace_callback),
                pg_sys::Datum::from(0),
            );
        }
    }
}

fn flush_if_needed() {
    if FLUSH_ALL.with(|f| f.replace(false)) {
        RELS.with(|r| r.borrow_mut().clear());
    }
}

/// Drop every cached entry (used after audit.track changes options).
pub fn forget(relid: Oid) {
    RELS.with(|r| {
        r.borrow_mut().remove(&relid);
    });
}

/// The configuration of `rel`, built on a miss (as `owner`, who can read
/// audit.tracked); a hit switches nothing.
///
/// # Safety
/// `rel` must be an open relation.
pub unsafe fn rel_config(rel: pg_sys::Relation, owner: Oid) -> Result<Rc<RelConfig>> {
    ensure_registered();
    flush_if_needed();
    // SAFETY: rel is open, so rd_id and rd_att are valid.
    let (relid, natts) = unsafe { ((*rel).rd_id, (*(*rel).rd_att).natts as usize) };
    if let Some(c) = RELS.with(|r| r.borrow().get(&relid).cloned()) {
        if c.natts == natts {
            return Ok(c);
        }
    }
    // A miss reads audit.tracked, which only the extension owner may read.
    let _owner = crate::privilege::AsOwner::enter(owner);
    // SAFETY: forwarded.
    let cfg = Rc::new(unsafe { build(rel)? });
    RELS.with(|r| r.borrow_mut().insert(relid, cfg.clone()));
    Ok(cfg)
}

/// # Safety
/// `rel` must be an open relation.
unsafe fn build(rel: pg_sys::Relation) -> Result<RelConfig> {
    // SAFETY: rel is open.
    let relid = unsafe { (*rel).rd_id };
    /// The tracked relation whose name the rows carry, its excluded and redacted
    /// columns, and whether it captures changes only.
    type Tracked = (Oid, Vec<String>, Vec<String>, bool);
    // 0.1.0's audit.tracked (before ALTER EXTENSION UPDATE) has no capture column.
    let capture = if crate::version::schema_is_current()? {
        "t.capture OPERATOR(pg_catalog.=) 'changes'"
    } else {
        "false"
    };
    let found = Spi::connect(|client| -> Result<Option<Tracked>> {
        let mut rows = client.select(
            &format!("SELECT a.relid::pg_catalog.oid, t.exclude, t.redact, {capture}
               FROM (SELECT $1::pg_catalog.regclass, 0::pg_catalog.int8
                     UNION ALL
                     SELECT * FROM pg_catalog.pg_partition_ancestors($1) WITH ORDINALITY) AS a(relid, ord)
               JOIN audit.tracked t ON t.relid OPERATOR(pg_catalog.=) a.relid
              ORDER BY a.ord LIMIT 1"),
            None,
            &[relid.into()],
        )?;
        match rows.next() {
            None => Ok(None),
            Some(r) => Ok(Some((
                r.get::<Oid>(1)?.unwrap_or(relid),
                r.get::<Vec<String>>(2)?.unwrap_or_default(),
                r.get::<Vec<String>>(3)?.unwrap_or_default(),
                r.get::<bool>(4)?.unwrap_or(false),
            ))),
        }
    })?;
    // A trigger without a tracked row (e.g. restored before audit.tracked) still records
    // everything, under the relation's own name: never lose a change.
    let (named, exclude, redact, changes) = found.unwrap_or((relid, vec![], vec![], false));
    // Names as bytes in the database encoding, which need not be UTF-8.
    // SAFETY: the relation (or its tracked ancestor) exists while rel is open; both
    // lookups return palloc'd C strings, or NULL if it vanished concurrently.
    let (schema, table) = unsafe {
        let bytes = |p: *const std::ffi::c_char| {
            if p.is_null() {
                Vec::new()
            } else {
                CStr::from_ptr(p).to_bytes().to_vec()
            }
        };
        (
            bytes(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(named))),
            bytes(pg_sys::get_rel_name(named)),
        )
    };

    // SAFETY: rd_att belongs to the open relation.
    let tupdesc = unsafe { PgTupleDesc::from_pg_unchecked((*rel).rd_att) };
    let mut columns = Vec::new();
    for (i, att) in tupdesc.iter().enumerate() {
        // A virtual generated column (PostgreSQL 18) is not stored: a trigger's
        // tuple holds NULL for it while every query computes it, so logging it
        // would make each image disagree with the row it is of. Its value is
        // the other columns' to derive; like an excluded column, it is not logged.
        if att.is_dropped() || att.attgenerated == b'v' as std::ffi::c_char {
            continue;
        }
        // SAFETY: attname is a NUL-terminated NameData.
        let name = unsafe { CStr::from_ptr(att.attname.data.as_ptr()) };
        if exclude.iter().any(|e| e.as_bytes() == name.to_bytes()) {
            continue;
        }
        columns.push(Column {
            attnum: i as i32 + 1,
            name: name.to_owned(),
            typid: att.atttypid,
            typlen: att.attlen,
            byval: att.attbyval,
            redacted: redact.iter().any(|r| r.as_bytes() == name.to_bytes()),
        });
    }
    // SAFETY: rel is open.
    let key = unsafe { crate::row_key::columns(rel) };
    let mut key_output = pg_sys::InvalidOid;
    if let [k] = &key[..] {
        let mut varlena = false;
        // SAFETY: a syscache lookup of an existing type (ERRORs otherwise).
        unsafe { pg_sys::getTypeOutputInfo(k.typid, &mut key_output, &mut varlena) };
    }
    let names: Vec<&std::ffi::CStr> = columns.iter().map(|c| c.name.as_c_str()).collect();
    let types: Vec<Oid> =
        columns.iter().map(|c| if c.redacted { pg_sys::TEXTOID } else { c.typid }).collect();
    // SAFETY: inside the transaction that opened rel; names and types have equal length.
    let full_row = unsafe { super::encode::ObjectBuilder::new(&names, &types) };
    Ok(RelConfig {
        named,
        full_row,
        schema_name: CString::new(schema).unwrap_or_default(),
        table_name: CString::new(table).unwrap_or_default(),
        columns,
        key,
        key_output,
        changes,
        natts: tupdesc.len(),
        changed: RefCell::new(None),
    })
}
