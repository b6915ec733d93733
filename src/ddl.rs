//! DDL on tracked tables becomes audit rows (operation 'DDL'), and the audit
//! data is guarded against DROP and TRUNCATE. The event triggers and guard
//! triggers themselves are SQL (sql/finalize.sql); they call these functions.

use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::json;

use crate::capture::actor;
use crate::chain::append::append_row;
use crate::db_text::{to_db, DbJson, DbText};
use crate::errors::{AuditError, OrRaise, Result};
use crate::log::Row;
use crate::settings;

/// Writes one 'DDL' audit row for `schema.table`. The texts are the
/// database's, as crate::db_text makes them: the row holds their very bytes,
/// in any database encoding.
pub fn record(schema: &str, table: &str, tag: &str, identity: &str, statement: &str) -> Result<()> {
    let info = actor::current_for_ddl()?;
    let ext = crate::ext::ext_state()?;
    let new =
        DbJson(json!({"command_tag": tag, "object_identity": identity, "statement": statement}));
    let datum = new.into_datum().ok_or_else(|| AuditError::Internal("jsonb conversion".into()))?;
    let (schema, table) = (to_db(schema), to_db(table));
    let row = Row {
        schema: &schema,
        table: &table,
        operation: "DDL",
        row_id: None,
        old_row_id: None,
        old_values: None,
        new_values: Some(datum),
        changed: None,
    };
    // SAFETY: new_values was just built as jsonb.
    unsafe { append_row(&ext, &info.actor(), row) }
}

#[pg_extern(volatile, parallel_unsafe, name = "_record_ddl")]
fn record_ddl(
    schema: Option<DbText>,
    table: Option<DbText>,
    tag: Option<DbText>,
    identity: Option<DbText>,
    statement: Option<DbText>,
) {
    // DbText, not &str: in a database that is not UTF-8, a statement with other
    // than ASCII in it would otherwise fail (pgrx reads &str as UTF-8 only).
    let schema = schema.ok_or(AuditError::NullArgument("schema")).or_raise();
    let table = table.ok_or(AuditError::NullArgument("table")).or_raise();
    let text = |t: Option<DbText>| t.unwrap_or_default().0;
    record(&schema.0, &table.0, &text(tag), &text(identity), &text(statement)).or_raise()
}

fn check(what: &str) -> Result<()> {
    if settings::ALLOW_DROP.get() {
        return Ok(());
    }
    if what == "extension audit_ext" {
        // An empty log holds nothing to lose.
        let sql = if crate::version::schema_is_current()? {
            "SELECT EXISTS (SELECT FROM audit.log) OR EXISTS (SELECT FROM audit.access_log)"
        } else {
            "SELECT EXISTS (SELECT FROM audit.log)"
        };
        let rows = Spi::get_one::<bool>(sql)?.unwrap_or(false);
        if !rows {
            return Ok(());
        }
    }
    Err(AuditError::DropRefused(what.to_string()))
}

/// Refuses to drop or truncate audit data unless `audit.allow_drop` is on.
/// Being a C function, calling it loads the library, so a placeholder value
/// set by a non-superuser before that is discarded, not trusted.
#[pg_extern(volatile, parallel_unsafe, name = "_check_drop")]
fn check_drop(what: Option<crate::db_text::DbText>) {
    // An object's identity may hold any name (crate::db_text): not pgrx's &str.
    check(what.as_ref().map_or("audit data", |t| t.0.as_str())).or_raise()
}

/// `ddl_command_start` event trigger for DROP EXTENSION and DROP SCHEMA: the
/// only moment audit_ext can still refuse its own removal (at `sql_drop` its
/// event triggers are already gone). Written against the raw fmgr API because
/// it reads the parse tree, which only C event-trigger functions can see.
#[no_mangle]
#[doc(hidden)]
pub extern "C" fn pg_finfo_audit_on_drop_start() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn audit_on_drop_start(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr passes a valid fcinfo; the context is checked before it is cast.
    let names = unsafe { dropped_names(fcinfo) };
    if let Some((kind, names)) = names {
        let ours = match kind {
            pg_sys::ObjectType::OBJECT_EXTENSION => names.iter().any(|n| n == "audit_ext"),
            pg_sys::ObjectType::OBJECT_SCHEMA => names.iter().any(|n| n == "audit"),
            _ => false,
        };
        if ours {
            check("extension audit_ext").or_raise();
        }
    }
    pg_sys::Datum::from(0)
}

/// The object kind and plain names of a DROP statement, if that is what fired us.
///
/// # Safety
/// `fcinfo` must be the call info PostgreSQL passed to this event trigger call.
unsafe fn dropped_names(
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<(pg_sys::ObjectType::Type, Vec<String>)> {
    // SAFETY: every pointer is checked for NULL and its node tag before use; the
    // parse tree lives for the duration of the call.
    unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_EventTriggerData {
            return None;
        }
        let tree = (*(ctx as *mut pg_sys::EventTriggerData)).parsetree;
        if tree.is_null() || (*tree).type_ != pg_sys::NodeTag::T_DropStmt {
            return None;
        }
        let stmt = tree as *mut pg_sys::DropStmt;
        let list = (*stmt).objects;
        let mut names = Vec::new();
        if !list.is_null() {
            for i in 0..(*list).length as usize {
                let node = (*(*list).elements.add(i)).ptr_value as *mut pg_sys::Node;
                if !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_String {
                    let s = (*(node as *mut pg_sys::String)).sval;
                    names.push(std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned());
                }
            }
        }
        Some(((*stmt).removeType, names))
    }
}
