//! audit.baseline: one `SNAPSHOT` row per live row of a tracked table that the
//! log knows nothing about, so that the log alone explains every row, also
//! those that predate tracking (audit.verify_table relies on it).
//!
//! Why no row is missed or doubled while writers run, without locking their rows:
//! everything is judged at one snapshot S, taken once this baseline holds its
//! table's turn (below). The table is read through a cursor on S, and a row gets
//! a SNAPSHOT only if the log, also read on S, has no row for its key. A writer
//! whose change committed before S is seen by both reads: its key has a log row
//! and is skipped. A writer that commits after S wrote its own INSERT, UPDATE or
//! DELETE row in its own transaction; so its key may end up with a SNAPSHOT of
//! the image at S *and* a real change, in either id order. verify_table gives a
//! real change precedence over a SNAPSHOT, so the pair means what the real change
//! says, which is the truth. A row inserted after S is not in the cursor and is
//! explained by its INSERT. Two baselines of one table take turns on its
//! audit.tracked row, and the second takes its S after the first has committed,
//! so it finds the first one's keys in the log: no key gets two SNAPSHOTs. Under
//! REPEATABLE READ, S would be the transaction's, older than that wait, so
//! baseline refuses to run there. A re-run writes nothing for keys already in the
//! log, which is why it is safe to repeat.
//!
//! "Has a row" means a whole image (crate::image): a key whose log rows are all
//! partial (capture 'changes', a row older than tracking) gets a SNAPSHOT too.
//! The readers put every partial row of the key over it, in order: a partial
//! row sets columns to values, so one that the image at S already includes
//! sets them again to what they are.
//!
//! The table is read as the caller (output functions and casts are user code);
//! the log is read and written as the extension owner, as the trigger writes it.

use std::collections::HashSet;
use std::ffi::CString;

use pgrx::pg_sys::{self, Datum};
use pgrx::prelude::*;
use pgrx::PgRelation;

use crate::chain::append::append_kept_row;
use crate::errors::{AuditError, OrRaise, Result};
use crate::live_rows::{text_bytes, BatchMemory, Cursor, Encoder, FreshSnapshot};
use crate::log::Row;
use crate::privilege::as_extension_owner;
use crate::time_travel::Table;

/// Rows encoded and written per batch: memory is bounded by this many row images.
pub const DEFAULT_BATCH: i32 = 10_000;

pub fn baseline_impl(rel: &PgRelation, batch: i32) -> Result<i64> {
    crate::query::refuse_during_recovery(c"audit.baseline()");
    if batch < 1 {
        return Err(AuditError::InvalidArgument(format!(
            "batch_size must be at least 1, not {batch}"
        )));
    }
    crate::tracking::check_trackable(rel)?;
    let t = Table::load(rel)?;
    t.need_key()?;
    // SAFETY: a plain read of the transaction's isolation level.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Err(AuditError::BaselineRefused(format!(
            "audit.baseline({}) needs READ COMMITTED: under a transaction snapshot it could not see \
             a baseline that another session committed while it waited",
            t.qname
        )));
    }
    let truncated = as_extension_owner(|| {
        // One baseline of a table at a time: the second waits here, before its reads.
        let writes = Spi::get_one_with_args::<bool>(
            "SELECT writes FROM audit.tracked WHERE relid OPERATOR(pg_catalog.=) $1 FOR UPDATE",
            &[rel.oid().into()],
        )?;
        if writes != Some(true) {
            return Err(AuditError::BaselineRefused(format!(
                "{} is tracked for reads only: its changes are not recorded, so there is nothing to baseline",
                t.qname
            )));
        }
        Ok(Spi::get_one::<bool>(&format!(
            "SELECT EXISTS (SELECT FROM audit.log WHERE {} AND row_id IS NULL
                               AND operation OPERATOR(pg_catalog.=) 'TRUNCATE')",
            t.log_filter()
        ))?
        .unwrap_or(false))
    })?;
    if truncated {
        // Every row live now came after the TRUNCATE, so through the trigger: a
        // SNAPSHOT could only vouch for one that did not.
        pgrx::notice!(
            "{} was truncated since tracking began: every live row must be explained by a change \
             after that, so there is nothing to baseline",
            t.qname
        );
        return Ok(0);
    }

    // S: taken after the wait above, so a baseline committed meanwhile is seen.
    let _s = FreshSnapshot::take();
    let enc = Encoder::new(rel)?;
    let info = crate::capture::actor::current()?;
    let ext = crate::ext::ext_state()?;
    // The log rows that make a key known: a whole image under the key, or any
    // row that moved away from it; `on(column)` says which keys are asked for.
    let known_rows = |on: &dyn Fn(&str) -> String| {
        format!(
            "SELECT row_id AS k FROM audit.log WHERE {f} AND {} AND NOT COALESCE({partial}, false)
             UNION ALL
             SELECT old_row_id FROM audit.log WHERE {f} AND {}",
            on("row_id"),
            on("old_row_id"),
            f = t.log_filter(),
            partial = crate::image::partial_sql("old_row_id IS NOT NULL")
        )
    };
    // One index scan per partition for the whole batch's keys, not a probe per key.
    let known_sql =
        known_rows(&|c| format!("{c} OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.text[])"));
    // When the log holds no more of the table's keys than one batch has rows
    // (above all: none, on a first baseline), they are read once, into a set no
    // bigger than a batch, instead of looked up batch by batch: each lookup
    // descends every partition's index once per key of the batch.
    let all_known_sql =
        format!("SELECT k FROM ({}) s LIMIT $1", known_rows(&|c| format!("{c} IS NOT NULL")));
    let scan = format!("SELECT {} FROM {} {}", enc.columns(), t.qname, enc.alias);
    let mem = BatchMemory::new();
    Spi::connect(|_| -> Result<i64> {
        let few_known = all_known(&all_known_sql, batch as i64)?;
        let mut cursor = Cursor::open(&scan, &[])?;
        let mut written = 0i64;
        // Stores one live row's SNAPSHOT, unless the log knows its key.
        let mut keep =
            |key: Option<Vec<u8>>, image: Datum, known: &HashSet<Vec<u8>>| -> Result<()> {
                let key = key.ok_or_else(|| {
                    AuditError::Internal(format!("a row of {} has a NULL key", t.qname))
                })?;
                if known.contains(&key) {
                    return Ok(());
                }
                let row = Row {
                    schema: enc.schema_name(),
                    table: enc.table_name(),
                    operation: "SNAPSHOT",
                    row_id: Some(key),
                    old_row_id: None,
                    old_values: None,
                    new_values: Some(image),
                    changed: None,
                };
                // SAFETY: the image is a jsonb datum alive for this call; a kept row is a copy.
                unsafe { append_kept_row(&ext, &info.actor(), row) }?;
                written += 1;
                Ok(())
            };
        loop {
            // Rows come straight from the executor's slot (no SPI copies), as
            // their columns (no whole-row tuple formed and taken apart again).
            // With the log's keys at hand, each row is stored as it comes; a
            // batch's keys are otherwise looked up together, after the fetch.
            let mut rows: Vec<(Option<Vec<u8>>, Datum)> = Vec::new();
            let n = mem.run(|| {
                cursor.push(batch as i64, &mut |values, nulls| {
                    mem.run(|| {
                        // SAFETY: a row of the scan, enc.columns(), valid for this call.
                        unsafe {
                            match &few_known {
                                Some(known) => enc
                                    .with_row(values, nulls, |key, image| keep(key, image, known)),
                                None => {
                                    rows.push(enc.encode(values, nulls)?);
                                    Ok(())
                                }
                            }
                        }
                    })
                })
            })?;
            if n == 0 {
                break;
            }
            if few_known.is_none() {
                let known = mem.run(|| known_keys(&known_sql, &rows))?;
                for (key, image) in rows {
                    // The image is in the batch context, alive until its reset.
                    mem.run(|| keep(key, image, &known))?;
                }
            }
            // The next batch's known-keys query reads the log: what this one kept
            // is written first, in multi-inserts (as COPY writes).
            crate::log::sink::flush();
            mem.reset();
            pgrx::check_for_interrupts!();
        }
        Ok(written)
    })
}

/// Every key the log has a row for (as in [`known_keys`]), if there are at most
/// `limit` of them; None if there are more.
fn all_known(sql: &str, limit: i64) -> Result<Option<HashSet<Vec<u8>>>> {
    as_extension_owner(|| {
        let mut cursor = Cursor::open(sql, &[(pg_sys::INT8OID, Some(Datum::from(limit + 1)))])?;
        let (known, rows) = drain_keys(&mut cursor)?;
        Ok((rows <= limit as usize).then_some(known))
    })
}

/// The text keys in column 1 of every row of `cursor`, and how many rows there were.
fn drain_keys(cursor: &mut Cursor) -> Result<(HashSet<Vec<u8>>, usize)> {
    let mut known = HashSet::new();
    let mut rows = 0;
    // Where a long key is detoasted: push runs in the portal's memory.
    let mem = BatchMemory::new();
    loop {
        let n = cursor.push(10_000, &mut |values, nulls| {
            if !nulls[0] {
                // SAFETY: column 1 is a row_id, text, non-null; copied out.
                known.insert(mem.run(|| unsafe { text_bytes(values[0]) }));
            }
            Ok(())
        })?;
        mem.reset();
        if n == 0 {
            return Ok((known, rows));
        }
        rows += n;
    }
}

/// Which of the batch's keys the log already has a row for, under the key or as
/// the key a row moved away from. Read on the same snapshot as the table.
fn known_keys(sql: &str, rows: &[(Option<Vec<u8>>, Datum)]) -> Result<HashSet<Vec<u8>>> {
    let keys: Vec<CString> = rows
        .iter()
        .filter_map(|(k, _)| k.clone())
        .map(CString::new)
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| AuditError::Internal("a row key holds a NUL byte".into()))?;
    let refs: Vec<&std::ffi::CStr> = keys.iter().map(|k| k.as_c_str()).collect();
    // SAFETY: a fresh text[] in the current (batch) context.
    let arr = unsafe { crate::datum::text_array(&refs) };
    as_extension_owner(|| {
        let mut cursor = Cursor::open_generic(sql, &[(pg_sys::TEXTARRAYOID, Some(arr))])?;
        // Each key at most once per log row: the cursor is drained.
        Ok(drain_keys(&mut cursor)?.0)
    })
}

#[pg_extern(volatile, parallel_unsafe)]
fn baseline(tbl: Option<PgRelation>, batch_size: default!(Option<i32>, 10000)) -> i64 {
    let _q = crate::quiet::Quiet::enter();
    let rel = tbl.ok_or(AuditError::NullArgument("tbl")).or_raise();
    let batch = batch_size.ok_or(AuditError::NullArgument("batch_size")).or_raise();
    baseline_impl(&rel, batch).or_raise()
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// A SNAPSHOT holds exactly the image the trigger logs for the same row:
    /// dropped and generated columns, arrays, numerics' scale and the redaction
    /// marker included. verify_table relies on it.
    #[pg_test]
    fn a_snapshot_is_the_image_the_trigger_logs() {
        Spi::run(
            "CREATE EXTENSION IF NOT EXISTS audit_ext;
             CREATE TABLE snap (id int PRIMARY KEY, gone int, a int[], n numeric, t text,
                                g int GENERATED ALWAYS AS (id * 2) STORED, secret text);
             ALTER TABLE snap DROP COLUMN gone;
             INSERT INTO snap (id, a, n, t, secret) VALUES (1, '{1,NULL}', 1.50, 'x\"y', 's');
             SELECT audit.track('snap', redact => '{secret}', baseline => true);
             INSERT INTO snap (id, a, n, t, secret) VALUES (2, '{1,NULL}', 1.50, 'x\"y', 's');",
        )
        .unwrap();
        let same = Spi::get_one::<bool>(
            "SELECT (SELECT new_values::text FROM audit.log WHERE table_name = 'snap' AND operation = 'SNAPSHOT')
                  = replace(replace((SELECT new_values::text FROM audit.log WHERE table_name = 'snap'
                                      AND operation = 'INSERT'), '\"g\": 4', '\"g\": 2'), '\"id\": 2', '\"id\": 1')",
        )
        .unwrap();
        assert_eq!(same, Some(true));
        let row_id = Spi::get_one::<String>(
            "SELECT row_id FROM audit.log WHERE table_name = 'snap' AND operation = 'SNAPSHOT'",
        )
        .unwrap();
        assert_eq!(row_id.as_deref(), Some("1"));
        // Hashed and sealed like any other row.
        Spi::run("SELECT audit.seal()").unwrap();
        assert_eq!(Spi::get_one::<bool>("SELECT ok FROM audit.verify()").unwrap(), Some(true));
    }

    /// A virtual generated column (PostgreSQL 18) is computed by every query but
    /// NULL in the trigger's tuple: logged, the trigger's images and the live
    /// rows that baseline and verify_table read would disagree on it, and an
    /// untouched table would not verify. It is left out of every image.
    #[cfg(feature = "pg18")]
    #[pg_test]
    fn a_virtual_generated_column_is_not_logged() {
        Spi::run(
            "CREATE EXTENSION IF NOT EXISTS audit_ext;
             CREATE TABLE virt (id int PRIMARY KEY, a int, g int GENERATED ALWAYS AS (a * 2) VIRTUAL);
             INSERT INTO virt (id, a) VALUES (1, 5);
             SELECT audit.track('virt', baseline => true);
             INSERT INTO virt (id, a) VALUES (2, 6);
             UPDATE virt SET a = 7 WHERE id = 1;",
        )
        .unwrap();
        let images = Spi::get_one::<String>(
            "SELECT string_agg(operation || ' ' || new_values::text, '; ' ORDER BY id)
               FROM audit.log WHERE table_name = 'virt'",
        )
        .unwrap();
        assert_eq!(
            images.as_deref(),
            Some(
                r#"SNAPSHOT {"a": 5, "id": 1}; INSERT {"a": 6, "id": 2}; UPDATE {"a": 7, "id": 1}"#
            )
        );
        let v =
            Spi::get_two::<bool, i64>("SELECT ok, rows_checked FROM audit.verify_table('virt')")
                .unwrap();
        assert_eq!(v, (Some(true), Some(2)));
        // Time travel answers with the stored columns only.
        let state =
            Spi::get_one::<String>("SELECT audit.state_at('virt', '1', now())::text").unwrap();
        assert_eq!(state.as_deref(), Some(r#"{"a": 7, "id": 1}"#));
    }
}
