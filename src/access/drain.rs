//! The worker's side of the queue: it takes its database's records and writes
//! them to audit.access_log, each with its id from audit.log's sequence and its
//! row hash, so sealing covers them like changes.

use std::collections::HashMap;
use std::ffi::CString;

use pgrx::pg_sys;

use super::queue;
use super::record::{Kind, Record, Text, COLUMN_BITS};
use crate::errors::{AuditError, Result};
use crate::log::access::AccessRow;

/// Records written per transaction: a failed batch loses no more than this.
pub const BATCH: usize = 1_000;

/// Writes up to one batch of this database's queued records; returns how many.
pub fn drain() -> Result<usize> {
    let ext = crate::ext::ext_state()?;
    if !crate::version::schema_is_current()? {
        return Ok(0); // 0.1.0's tables have no audit.access_log
    }
    // SAFETY: a plain read of the database this worker is connected to.
    let db = unsafe { pg_sys::MyDatabaseId };
    // Only where reads are audited: a database that records changes alone is not told.
    let audits_reads = || -> Result<bool> {
        Ok(crate::query::one::<bool>(
            "SELECT EXISTS (SELECT FROM audit.tracked WHERE reads) OR EXISTS (SELECT FROM audit.access_log)",
        )?
        .unwrap_or(false))
    };
    if let Some(since) = queue::unclean_stop_to_tell(db).filter(|_| audits_reads().unwrap_or(true))
    {
        let mut r = Record::new(Kind::Lost);
        r.h.db = db;
        r.h.accessed_at = since;
        r.h.until = since;
        r.h.rows = -1; // unknown
        r.set_texts([b"", b"", b"LOST", b"", b"", b"", b"", b"", b""], |_, n| n);
        write(&ext, &r, &mut Cache::default())?;
        crate::log::sink::flush();
    }
    let mut batch = TAKEN.with(|t| std::mem::take(&mut *t.borrow_mut()));
    let n = queue::take(db, BATCH, &mut batch);
    let written = write_batch(&ext, db, &batch[..n]);
    TAKEN.with(|t| *t.borrow_mut() = batch);
    written
}

thread_local! {
    /// The worker's batch buffer, kept between batches.
    static TAKEN: std::cell::RefCell<Vec<Record>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn write_batch(ext: &crate::ext::ExtState, db: pg_sys::Oid, batch: &[Record]) -> Result<usize> {
    if batch.is_empty() {
        return Ok(0);
    }
    // The records have left the queue: if they cannot be written, a row says so.
    use crate::errors::OrRaise;
    let written = crate::subxact::run(
        || {
            let mut cache = Cache::default();
            for rec in batch {
                write(ext, rec, &mut cache).or_raise();
            }
            // Inside the subtransaction: a failure to write the kept rows is this batch's.
            crate::log::sink::flush();
        },
        |_| true,
    );
    if let Err(e) = written {
        pgrx::warning!(
            "audit_ext: {} read record(s) could not be written: {}",
            batch.len(),
            e.message
        );
        let mut r = Record::new(Kind::Lost);
        r.h.db = db;
        r.h.accessed_at = batch.iter().map(|b| b.h.accessed_at).min().unwrap_or_default();
        r.h.until = batch.iter().map(|b| b.h.accessed_at).max().unwrap_or_default();
        r.h.rows = batch.len() as i64;
        r.set_texts([b"", b"", b"LOST", b"", b"", b"", b"", b"", b""], |_, n| n);
        write(ext, &r, &mut Cache::default())?;
        crate::log::sink::flush();
    }
    Ok(batch.len())
}

/// Drops this database's queued records: its extension is gone, and its log with it.
pub fn discard() {
    // SAFETY: a plain read of the database this worker is connected to.
    let db = unsafe { pg_sys::MyDatabaseId };
    let mut batch = Vec::new();
    while queue::take(db, BATCH, &mut batch) > 0 {}
}

/// A timestamp as timestamptz's text output.
fn timestamp_text(t: pg_sys::TimestampTz) -> String {
    pgrx::datum::TimestampWithTimeZone::try_from(t).map(|t| t.to_string()).unwrap_or_default()
}

/// The five characters of a packed SQLSTATE.
fn sqlstate(code: i32) -> Vec<u8> {
    (0..5).map(|i| (((code >> (6 * i)) & 0x3F) as u8) + b'0').collect()
}

/// A jsonb datum from its text (session_info as the backend built it).
fn jsonb(text: &[u8]) -> Option<pg_sys::Datum> {
    if text.is_empty() {
        return None;
    }
    let c = CString::new(text).ok()?;
    // SAFETY: jsonb_in takes a cstring datum; the text is jsonb_out's own output.
    unsafe { pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(c.as_ptr().into())]) }
}

/// What one batch's records share, worked out once: each table's live columns
/// (number, name) in column order, and each session's session_info as jsonb
/// (a session's records carry the same text until a setting changes).
#[derive(Default)]
struct Cache {
    columns: HashMap<pg_sys::Oid, Vec<(i32, Vec<u8>)>>,
    /// The names a record's column set stands for: a statement's records share them.
    read: HashMap<ColumnSet, Vec<Vec<u8>>>,
    sessions: HashMap<Vec<u8>, Option<(pg_sys::Datum, Vec<u8>)>>,
}

/// A table and the columns a record says were read of it (all: None).
type ColumnSet = (pg_sys::Oid, Option<[u8; COLUMN_BITS / 8]>);

/// The names of the columns a record says were read (all of them when unknown).
fn column_names<'c>(
    rec: &Record,
    tables: &mut HashMap<pg_sys::Oid, Vec<(i32, Vec<u8>)>>,
    read: &'c mut HashMap<ColumnSet, Vec<Vec<u8>>>,
) -> &'c [Vec<u8>] {
    let key: ColumnSet = (rec.h.relid, rec.h.has_columns.then_some(rec.h.columns));
    read.entry(key).or_insert_with(|| names_read(rec, tables))
}

fn names_read(
    rec: &Record,
    tables: &mut HashMap<pg_sys::Oid, Vec<(i32, Vec<u8>)>>,
) -> Vec<Vec<u8>> {
    let all = tables.entry(rec.h.relid).or_insert_with(|| {
        // SAFETY: the relation is opened (if it still exists) under AccessShareLock and
        // its descriptor read while it is open; names are copied out.
        unsafe {
            let rel = pg_sys::try_relation_open(rec.h.relid, pg_sys::AccessShareLock as i32);
            if rel.is_null() {
                return Vec::new(); // dropped since the read: no names to give
            }
            let desc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
            let cols = desc
                .iter()
                .enumerate()
                .filter(|(_, a)| !a.is_dropped())
                .map(|(i, a)| {
                    (
                        i as i32 + 1,
                        std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_bytes().to_vec(),
                    )
                })
                .collect();
            pg_sys::relation_close(rel, pg_sys::AccessShareLock as i32);
            cols
        }
    });
    if !rec.h.has_columns {
        return all.iter().map(|(_, n)| n.clone()).collect();
    }
    let wanted: Vec<i32> = rec.column_numbers().collect();
    all.iter().filter(|(a, _)| wanted.contains(a)).map(|(_, n)| n.clone()).collect()
}

fn write(ext: &crate::ext::ExtState, rec: &Record, cache: &mut Cache) -> Result<()> {
    let lost = rec.h.kind == Kind::Lost;
    let statement = if lost && rec.h.rows < 0 {
        Some(
            b"the server stopped abruptly (an immediate shutdown or a crash): reads that were running \
then may be missing, and all queued reads if its postmaster died; how many is unknown"
                .to_vec(),
        )
    } else if lost && rec.h.pid == 0 {
        Some(
            format!(
                "{} read record(s) between {} and {} could not be written by the worker (see the server log)",
                rec.h.rows,
                timestamp_text(rec.h.accessed_at),
                timestamp_text(rec.h.until)
            )
            .into_bytes(),
        )
    } else if lost {
        Some(
            format!(
                "{} read record(s) of backend {} between {} and {} were not recorded: the access-audit queue was full",
                rec.h.rows,
                rec.h.pid,
                timestamp_text(rec.h.accessed_at),
                timestamp_text(rec.h.until)
            )
            .into_bytes(),
        )
    } else {
        let mut s = rec.text(Text::Statement).to_vec();
        if rec.truncated(Text::Statement) {
            s.extend_from_slice(b" /* audit_ext: statement cut here */");
        }
        Some(s)
    };
    let columns =
        if lost { None } else { Some(column_names(rec, &mut cache.columns, &mut cache.read)) };
    let info = rec.text(Text::SessionInfo);
    if !cache.sessions.contains_key(info) {
        // The text the hash covers is jsonb_out's of the stored datum, made once per session.
        let made = match jsonb(info) {
            // SAFETY: the datum was just made by jsonb_in.
            Some(d) => Some((d, unsafe { crate::chain::append::jsonb_text(d) }?)),
            None => None,
        };
        cache.sessions.insert(info.to_vec(), made);
    }
    let session = &cache.sessions[info];
    let row = AccessRow {
        accessed_at: rec.h.accessed_at,
        schema: rec.text(Text::Schema),
        table: rec.text(Text::Table),
        command: rec.text(Text::Command),
        columns,
        rows: (rec.h.rows >= 0).then_some(rec.h.rows),
        outcome: if lost { b"lost" } else { rec.h.outcome.as_str().as_bytes() },
        sqlstate: (rec.h.sqlstate != 0).then(|| sqlstate(rec.h.sqlstate)),
        accessed_by: rec.text(Text::AccessedBy),
        db_user: rec.text(Text::DbUser),
        role: rec.text(Text::Role),
        txid: (rec.h.txid != 0).then_some(rec.h.txid as i64),
        session_info: session.as_ref().map(|(d, t)| (*d, t.as_slice())),
        query_id: (rec.h.query_id != 0).then_some(rec.h.query_id),
        statement,
        parameters: jsonb(rec.text(Text::Parameters)),
        backend_pid: rec.h.pid,
    };
    if lost && rec.h.until == 0 {
        return Err(AuditError::Internal("a loss record without its time range".into()));
    }
    // SAFETY: the jsonb datums were just made by jsonb_in.
    unsafe { crate::chain::append::append_access(ext, &row) }.map(|_| ())
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use super::super::record::{Kind, Record};
    use super::{write, Cache};

    fn read_record(table: &[u8]) -> Box<Record> {
        let mut r = Record::new(Kind::Read);
        // SAFETY: plain reads of this backend's state.
        unsafe {
            r.h.db = pg_sys::MyDatabaseId;
            r.h.pid = pg_sys::MyProcPid;
            r.h.accessed_at = pg_sys::GetCurrentTransactionStartTimestamp();
        }
        r.h.rows = 1;
        r.set_texts(
            [
                b"public",
                table,
                b"SELECT",
                b"alice",
                b"postgres",
                b"postgres",
                b"",
                b"SELECT 1",
                b"",
            ],
            |_, n| n,
        );
        r
    }

    fn count(table: &str) -> i64 {
        Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM audit.access_log WHERE table_name = $1",
            &[table.into()],
        )
        .unwrap()
        .unwrap()
    }

    /// The worker's rows wait in the writer's buffer until the batch is flushed:
    /// a batch that fails part-way leaves none of them, and a flushed batch
    /// leaves all of them, in id order, under a chain that verifies.
    #[pg_test]
    fn a_batch_is_written_whole_or_not_at_all() {
        Spi::run("CREATE EXTENSION IF NOT EXISTS audit_ext").unwrap();
        let ext = crate::ext::ext_state().unwrap();
        let failed = crate::subxact::run(
            || {
                let mut cache = Cache::default();
                for _ in 0..5 {
                    write(&ext, &read_record(b"failed_batch"), &mut cache).unwrap();
                }
                pgrx::error!("the batch fails before its flush");
            },
            |_| true,
        );
        assert!(failed.is_err());
        crate::log::sink::flush();
        assert_eq!(count("failed_batch"), 0, "no row of a failed batch may be written");

        let written = crate::subxact::run(
            || {
                let mut cache = Cache::default();
                for _ in 0..crate::log::sink::MULTI_INSERT_ROWS + 7 {
                    write(&ext, &read_record(b"whole_batch"), &mut cache).unwrap();
                }
                crate::log::sink::flush();
            },
            |_| true,
        );
        assert!(written.is_ok());
        assert_eq!(count("whole_batch"), crate::log::sink::MULTI_INSERT_ROWS as i64 + 7);
        let in_order = Spi::get_one::<bool>(
            "SELECT bool_and(id > prev) FROM (SELECT id, lag(id, 1, 0::bigint) OVER (ORDER BY ctid) AS prev
               FROM audit.access_log WHERE table_name = 'whole_batch') s",
        )
        .unwrap();
        assert_eq!(in_order, Some(true), "rows are stored in id order");
        let ok = Spi::get_one::<bool>("SELECT ok FROM audit.verify()").unwrap();
        assert_eq!(ok, Some(true));
    }
}
