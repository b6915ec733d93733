//! audit.verify_table: does the live table hold what the log says it must hold
//! now? verify() proves the log was not rewritten; this proves the table was not
//! changed behind the trigger (session_replication_role = replica, a disabled
//! trigger, a TRUNCATE with triggers off, ...).
//!
//! One pass: the table's rows and the log's last image per key, both in row_id
//! order (bytewise, COLLATE "C"), merged here. The log side is a cursor; the
//! table side is a query run to its end (so that it may read and sort in
//! parallel) whose rows are merged as they come. Both are read-only, so on one
//! snapshot, the calling statement's: a change that commits meanwhile is in
//! neither, and one made earlier in the caller's own transaction is in both (a
//! change and its log row commit together).
//!
//! The log's image of a key is its newest row after the table's last logged
//! TRUNCATE, a real change (INSERT, UPDATE, DELETE, or a move away from the key)
//! taking precedence over a SNAPSHOT (src/baseline.rs says why). Ids order the
//! changes of one key: a second writer of a row waits for the first to commit
//! before its trigger draws an id.
//!
//! The table is read as the caller (casts and output functions are user code)
//! and each row is encoded by the trigger's own encoder, so excluded columns are
//! absent and redacted ones are markers on both sides. Images are compared as
//! jsonb_out's exact text, so a numeric's scale or a string's bytes count: first
//! as binary jsonb (the same bytes have the same text, and a row the trigger
//! encoded is encoded again to the same bytes), and only when those differ as
//! text, which is the verdict.

use std::collections::VecDeque;

use pgrx::pg_sys::{self, Datum};
use pgrx::prelude::*;
use pgrx::PgRelation;

use crate::chain::append::jsonb_text;
use crate::db_text::DbText;
use crate::errors::{AuditError, OrRaise, Result};
use crate::live_rows::{text_bytes, text_slice, BatchMemory, Cursor, Encoder};
use crate::privilege::as_extension_owner;
use crate::time_travel::Table;

/// Rows fetched from each side at a time.
const FETCH: i64 = 2_000;

#[derive(Debug, Default)]
pub struct TableReport {
    pub ok: bool,
    pub rows_checked: i64,
    pub missing: i64,
    pub unexplained: i64,
    pub changed: i64,
    /// These two are Rust text as crate::db_text makes it of the database's.
    pub first_bad_row_id: Option<String>,
    pub detail: String,
}

/// The log's last word on one key.
struct LogEntry {
    key: Vec<u8>,
    /// Whether the key is live after it (INSERT, UPDATE, SNAPSHOT).
    live: bool,
    /// The binary jsonb (a whole varlena, detoasted).
    image: Option<Vec<u8>>,
    /// The newest row holds only changed columns (capture 'changes'): the
    /// image is folded from the key's rows (crate::image) before it is compared.
    partial: bool,
}

/// A jsonb datum's bytes, detoasted, header included.
///
/// # Safety
/// `d` must be a valid, non-null jsonb datum.
unsafe fn jsonb_bytes(d: pg_sys::Datum) -> Vec<u8> {
    // SAFETY: detoasting a valid varlena; the copy is taken before anything is freed.
    unsafe {
        let p = pg_sys::pg_detoast_datum(d.cast_mut_ptr());
        std::slice::from_raw_parts(p as *const u8, pgrx::varlena::varsize_any(p)).to_vec()
    }
}

/// jsonb_out's text of jsonb bytes taken by [`jsonb_bytes`].
fn bytes_text(b: &[u8]) -> Result<Vec<u8>> {
    // SAFETY: a palloc'd (so aligned) copy of a whole, detoasted jsonb varlena.
    unsafe {
        let p = pg_sys::palloc(b.len()) as *mut u8;
        std::ptr::copy_nonoverlapping(b.as_ptr(), p, b.len());
        let text = jsonb_text(pg_sys::Datum::from(p));
        pg_sys::pfree(p.cast());
        text
    }
}

/// Whether two images have the same text: the same bytes do; other bytes are
/// compared as text (a numeric's binary form can differ for one text).
fn same_image(live: &[u8], logged: &[u8]) -> Result<bool> {
    Ok(live == logged || bytes_text(live)? == bytes_text(logged)?)
}

/// Why a row is bad, for the detail of the first one.
enum Bad {
    Changed {
        live: Vec<u8>,
        logged: Vec<u8>,
    },
    Missing,
    /// `pruned`: retention has removed log partitions, perhaps this row's rows.
    NotLogged {
        baseline: bool,
        pruned: bool,
    },
    Deleted,
    /// Only partial rows (capture 'changes'), no whole image to start from.
    NoWholeImage,
}

impl Bad {
    fn describe(&self) -> String {
        match self {
            Bad::Changed { live, logged } => format!(
                "differs from the log's last image of it in column(s) {}: changed behind the trigger",
                changed_columns(live, logged)
            ),
            Bad::Missing => "is missing: the log says it is live, but the table has no such row (deleted behind the trigger)".into(),
            Bad::NotLogged { pruned: true, .. } => "has no row in the log: inserted behind the trigger, \
                 or retention removed every log row of it (audit.baseline() records such rows again)".into(),
            Bad::NotLogged { baseline: false, .. } => "has no row in the log, and the table has no baseline: \
                 rows that predate tracking are only explained after audit.baseline()".into(),
            Bad::NotLogged { baseline: true, .. } => "has no row in the log (inserted behind the trigger)".into(),
            Bad::Deleted => "exists, but the log says it was deleted or moved to another key \
                 (put back behind the trigger)".into(),
            Bad::NoWholeImage => "has only changed columns in the log (capture 'changes') and no whole image: \
                 it predates tracking (audit.baseline() records it whole)".into(),
        }
    }
}

/// The top-level keys whose values differ between two images (for the detail
/// only: the verdict compares the exact text).
fn changed_columns(live: &[u8], logged: &[u8]) -> String {
    let parse =
        |b: &[u8]| serde_json::from_str::<serde_json::Value>(&crate::db_text::to_rust(b)).ok();
    match (parse(live), parse(logged)) {
        (Some(serde_json::Value::Object(a)), Some(serde_json::Value::Object(b))) => {
            let mut cols: Vec<&String> = a
                .keys()
                .chain(b.keys().filter(|k| !a.contains_key(*k)))
                .filter(|k| a.get(*k) != b.get(*k))
                .collect();
            cols.sort();
            let cols: Vec<String> = cols.into_iter().map(|c| c.to_string()).collect();
            if cols.is_empty() {
                "?".into()
            } else {
                cols.join(", ")
            }
        }
        _ => "?".into(),
    }
}

pub fn verify_table_impl(rel: &PgRelation) -> Result<TableReport> {
    let t = Table::load(rel)?; // SELECT on the table, as state_at needs
    t.need_key()?;
    let enc = Encoder::new(rel)?;
    let f = t.log_filter();
    let (baseline, pruned) = as_extension_owner(|| {
        let baseline = crate::query::one::<bool>(&format!(
            "SELECT EXISTS (SELECT FROM audit.log WHERE {f} AND operation OPERATOR(pg_catalog.=) 'SNAPSHOT')"
        ))?
        .unwrap_or(false);
        let pruned = crate::query::one::<bool>(
            "SELECT EXISTS (SELECT FROM audit.horizon WHERE horizon OPERATOR(pg_catalog.>) '-infinity')",
        )?
        .unwrap_or(false);
        Ok((baseline, pruned))
    })?;
    let log_sql = format!(
        "WITH cut AS (SELECT COALESCE(pg_catalog.max(id), 0) AS id FROM audit.log
                       WHERE {f} AND row_id IS NULL AND operation OPERATOR(pg_catalog.=) 'TRUNCATE'),
              ev AS (SELECT row_id COLLATE pg_catalog.\"C\" AS k, id, operation AS op, new_values AS img,
                            COALESCE({partial}, false) AS partial
                       FROM audit.log WHERE {f} AND row_id IS NOT NULL
                        AND id OPERATOR(pg_catalog.>) (SELECT cut.id FROM cut)
                     UNION ALL
                     SELECT old_row_id COLLATE pg_catalog.\"C\", id, 'MOVED', NULL, false
                       FROM audit.log WHERE {f} AND old_row_id IS NOT NULL
                        AND id OPERATOR(pg_catalog.>) (SELECT cut.id FROM cut))
         SELECT DISTINCT ON (k) k, op OPERATOR(pg_catalog.=) ANY (ARRAY['INSERT', 'UPDATE', 'SNAPSHOT']), img, partial
           FROM ev ORDER BY k, op OPERATOR(pg_catalog.=) 'SNAPSHOT', id DESC",
        partial = crate::image::partial_sql("old_row_id IS NOT NULL")
    );
    // A key whose newest row is partial: its rows since the last TRUNCATE, newest first.
    let key_sql = format!(
        "SELECT operation, old_values, new_values, changed_fields, old_row_id IS NOT NULL FROM audit.log
          WHERE {f} AND row_id OPERATOR(pg_catalog.=) $1
            AND id OPERATOR(pg_catalog.>) (SELECT COALESCE(pg_catalog.max(id), 0) FROM audit.log
                                            WHERE {f} AND row_id IS NULL AND operation OPERATOR(pg_catalog.=) 'TRUNCATE')
          ORDER BY id DESC"
    );
    let live_sql = format!(
        "SELECT ({}) COLLATE pg_catalog.\"C\" AS k, {} FROM {} {} ORDER BY 1",
        t.key_expr_on(&enc.alias),
        enc.columns(),
        t.qname,
        enc.alias
    );
    let mut m = Merge {
        log: VecDeque::new(),
        log_done: false,
        key_sql: &key_sql,
        mem: BatchMemory::new(),
        r: TableReport::default(),
        first: None,
        last_live: None,
        baseline,
        pruned,
    };
    Spi::connect(|_| -> Result<()> {
        let mut log_cur = as_extension_owner(|| Cursor::open(&log_sql, &[]))?;
        // The table side is the driving query: run to its end, so it may use
        // parallel workers to read and sort, and each row is merged as it comes.
        let rows = BatchMemory::new();
        let mut since_reset = 0;
        crate::live_rows::stream(&live_sql, &mut |values, nulls| {
            if nulls[0] {
                return Err(AuditError::Internal("a live row without a key".into()));
            }
            let r = rows.run(|| -> Result<()> {
                // SAFETY: the live query's columns: k text, then enc.columns(); the
                // key's bytes live until the reset below.
                unsafe {
                    let key = text_slice(values[0]);
                    enc.with_image(&values[1..], &nulls[1..], |image| {
                        m.live_row(&mut log_cur, key, image)
                    })?
                }
            });
            since_reset += 1;
            if since_reset == FETCH as usize {
                rows.reset();
                since_reset = 0;
            }
            r
        })?;
        m.log_rest(&mut log_cur)
    })?;
    let Merge { mut r, first, .. } = m;
    r.ok = first.is_none();
    match first {
        None => r.detail = format!("{} live row(s) of {} match the log", r.rows_checked, t.qname),
        Some((key, why)) => {
            // In the database's own encoding when it is reported (crate::db_text).
            let key = crate::db_text::to_rust(&key).into_owned();
            r.detail = format!(
                "{}: {} changed, {} missing, {} unexplained; first: row {key} {}",
                t.qname,
                r.changed,
                r.missing,
                r.unexplained,
                why.describe()
            );
            r.first_bad_row_id = Some(key);
        }
    }
    Ok(r)
}

/// The merge of the table's rows, pushed in key order, with the log's last
/// word per key, pulled from its cursor in the same order.
struct Merge<'a> {
    log: VecDeque<LogEntry>,
    log_done: bool,
    key_sql: &'a str,
    /// Where a fetch of log entries is read, reset after each.
    mem: BatchMemory,
    r: TableReport,
    first: Option<(Vec<u8>, Bad)>,
    last_live: Option<Vec<u8>>,
    baseline: bool,
    pruned: bool,
}

impl Merge<'_> {
    /// The log's next entry, fetched when none is left; None at its end.
    fn peek(&mut self, cur: &mut Cursor) -> Result<Option<&LogEntry>> {
        if self.log.is_empty() && !self.log_done {
            let (log, mem) = (&mut self.log, &self.mem);
            let n = as_extension_owner(|| {
                cur.push(FETCH, &mut |v, n| mem.run(|| log_entry(v, n, log)))
            })?;
            mem.reset();
            self.log_done = n == 0;
            for g in self.log.iter_mut().filter(|g| g.partial) {
                g.image =
                    as_extension_owner(|| self.mem.run(|| folded_image(self.key_sql, &g.key)))?;
                self.mem.reset();
            }
        }
        Ok(self.log.front())
    }

    fn note(&mut self, bad: Option<(Vec<u8>, Bad)>) {
        if self.first.is_none() {
            self.first = bad;
        }
    }

    /// A log entry whose key the table does not have.
    fn log_only(&mut self, g: LogEntry) {
        if g.live {
            self.r.missing += 1;
            self.note(Some((g.key, Bad::Missing)));
        }
    }

    fn live_row(&mut self, cur: &mut Cursor, key: &[u8], image: &[u8]) -> Result<()> {
        self.r.rows_checked += 1;
        check_order(&mut self.last_live, key)?;
        while self.peek(cur)?.is_some_and(|g| g.key.as_slice() < key) {
            let g = self.log.pop_front().expect("peeked");
            self.log_only(g);
        }
        let bad = match self.log.front() {
            Some(g) if g.key == key => {
                let g = self.log.pop_front().expect("peeked");
                if !g.live {
                    self.r.unexplained += 1;
                    Some((key.to_vec(), Bad::Deleted))
                } else if let Some(logged) = g.image {
                    if same_image(image, &logged)? {
                        None
                    } else {
                        self.r.changed += 1;
                        // The texts are for the first bad row's detail only.
                        if self.first.is_none() {
                            let logged = bytes_text(&logged)?;
                            Some((key.to_vec(), Bad::Changed { live: bytes_text(image)?, logged }))
                        } else {
                            None
                        }
                    }
                } else {
                    self.r.unexplained += 1;
                    Some((key.to_vec(), Bad::NoWholeImage))
                }
            }
            _ => {
                self.r.unexplained += 1;
                Some((
                    key.to_vec(),
                    Bad::NotLogged { baseline: self.baseline, pruned: self.pruned },
                ))
            }
        };
        self.note(bad);
        Ok(())
    }

    /// The log's entries after the table's last row.
    fn log_rest(&mut self, cur: &mut Cursor) -> Result<()> {
        while self.peek(cur)?.is_some() {
            let g = self.log.pop_front().expect("peeked");
            self.log_only(g);
        }
        Ok(())
    }
}

/// The live side must come in the log side's order, or the merge would count
/// rows that are there as missing: a guard on the key rule's two spellings.
fn check_order(last: &mut Option<Vec<u8>>, key: &[u8]) -> Result<()> {
    match last {
        Some(p) if p.as_slice() >= key => Err(AuditError::Internal(format!(
            "verify_table: live keys out of order at {}",
            String::from_utf8_lossy(key)
        ))),
        Some(p) => {
            // The same buffer, row after row.
            p.clear();
            p.extend_from_slice(key);
            Ok(())
        }
        None => {
            *last = Some(key.to_vec());
            Ok(())
        }
    }
}

/// One row of the log query: k text (not NULL), live bool, img jsonb, partial bool.
fn log_entry(v: &[Datum], n: &[bool], out: &mut VecDeque<LogEntry>) -> Result<()> {
    if n[0] {
        return Ok(());
    }
    // SAFETY: the log query's columns, as above; non-null where read.
    unsafe {
        out.push_back(LogEntry {
            key: text_bytes(v[0]),
            live: !n[1] && v[1].value() != 0,
            image: if n[2] { None } else { Some(jsonb_bytes(v[2])) },
            partial: !n[3] && v[3].value() != 0,
        });
    }
    Ok(())
}

/// The image after a key's newest partial row: folded back to its last whole
/// image (crate::image), as jsonb bytes; None when there is none.
fn folded_image(key_sql: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
    // A read-only cursor, so on the active snapshot, the merge's: pgrx's select
    // takes a fresh snapshot in a transaction that has written, which would see
    // a change committed while verify_table runs and raise a false alarm.
    // Under an SPI connection of its own: the table's query is running.
    let changes = Spi::connect(|_| -> Result<Vec<crate::image::Change>> {
        // SAFETY: a fresh text datum in the current context, copied into the portal.
        let arg = unsafe { crate::datum::text_datum(key) };
        let mut cur = Cursor::open(key_sql, &[(pg_sys::TEXTOID, Some(arg))])?;
        let mut v = Vec::new();
        // Each Change owns its values (converted from the row): the portal's
        // memory, where push runs, gains nothing per row.
        while cur.push(FETCH, &mut |values, nulls| {
            // SAFETY: key_sql's columns: operation, old_values, new_values,
            // changed_fields, old_row_id IS NOT NULL.
            v.push(unsafe { crate::image::Change::from_values(values, nulls, false) });
            Ok(())
        })? > 0
        {}
        Ok(v)
    })?;
    match crate::image::after_last(changes).flatten() {
        None => Ok(None),
        // Back through jsonb_in: compared as every image is.
        Some(v) => {
            let text = std::ffi::CString::new(v.to_string())
                .map_err(|_| AuditError::Internal("a NUL in a folded image".into()))?;
            // SAFETY: serde_json writes valid JSON; the fresh datum is read at once.
            Ok(Some(unsafe { jsonb_bytes(crate::capture::encode::jsonb_from_str(&text)) }))
        }
    }
}

#[allow(clippy::type_complexity)] // the result's columns, as pgrx spells them
#[pg_extern(stable, parallel_safe)]
fn verify_table(
    tbl: Option<PgRelation>,
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(rows_checked, i64),
        name!(missing, i64),
        name!(unexplained, i64),
        name!(changed, i64),
        name!(first_bad_row_id, Option<DbText>),
        name!(detail, DbText),
    ),
> {
    let relid = tbl.as_ref().map(|r| r.oid());
    let _q = crate::quiet::Quiet::enter();
    let rel = tbl.ok_or(AuditError::NullArgument("tbl")).or_raise();
    let r = verify_table_impl(&rel).or_raise();
    if let Some(relid) = relid {
        // What it read is the table: a read, for access auditing, as time travel notes its own.
        crate::access::note_function_read(relid, "audit.verify_table", r.rows_checked);
    }
    TableIterator::once((
        r.ok,
        r.rows_checked,
        r.missing,
        r.unexplained,
        r.changed,
        r.first_bad_row_id.as_deref().map(DbText::from_rust),
        DbText::from_rust(&r.detail),
    ))
}

/// Folds the table checks into verify()'s report: one call, both proofs.
pub fn verify_tables(tables: Vec<PgRelation>) -> Result<(bool, String)> {
    let mut ok = true;
    let mut parts = Vec::new();
    for rel in tables {
        let r = verify_table_impl(&rel)?;
        // A read of the table, as verify_table's own (audit.verify names it).
        crate::access::note_function_read(rel.oid(), "audit.verify", r.rows_checked);
        ok &= r.ok;
        parts.push(r.detail);
    }
    Ok((ok, parts.join("; ")))
}
