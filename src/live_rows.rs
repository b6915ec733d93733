//! A tracked table's live rows, seen exactly as the capture trigger encodes
//! them: audit.baseline writes these images, audit.verify_table compares them
//! with the log, and time travel answers with them for rows that did not change
//! since; so all go through `capture::encode_row` and `capture::row_key` rather
//! than a second encoder that could drift from it.
//!
//! Rows are read through a cursor over the calling statement's snapshot and
//! fetched in batches whose memory is freed as the scan moves on, so neither
//! function's memory grows with the table.

use std::ffi::{c_char, CString};
use std::rc::Rc;

use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::{pg_guard, PgRelation};

use crate::capture::cache::RelConfig;
use crate::capture::{encode_row, row_key, Deformed};
use crate::errors::{AuditError, Result};
use crate::quote::ident as quote_ident;

/// An SPI cursor opened read-only, so it runs on the active snapshot (the
/// calling statement's): two cursors opened by one call see the same database.
/// Callers must be connected to SPI for the cursor's life.
pub(crate) struct Cursor {
    portal: pg_sys::Portal,
}

impl Cursor {
    /// Opens `sql` with parameters `args` (type, value; None is NULL), as the
    /// current user: privileges are checked now, as that user.
    pub(crate) fn open(sql: &str, args: &[(Oid, Option<Datum>)]) -> Result<Cursor> {
        Self::open_with(sql, args, 0)
    }

    /// As [`Cursor::open`], planned without looking at the parameters' values: for
    /// a large array parameter, whose selectivity the planner would otherwise
    /// estimate element by element, for every partition, at every call.
    pub(crate) fn open_generic(sql: &str, args: &[(Oid, Option<Datum>)]) -> Result<Cursor> {
        Self::open_with(sql, args, pg_sys::CURSOR_OPT_GENERIC_PLAN as i32)
    }

    fn open_with(sql: &str, args: &[(Oid, Option<Datum>)], options: i32) -> Result<Cursor> {
        let sql = CString::new(sql).map_err(|_| AuditError::Internal("NUL in a query".into()))?;
        let mut types: Vec<Oid> = args.iter().map(|a| a.0).collect();
        let mut values: Vec<Datum> = args.iter().map(|a| a.1.unwrap_or(Datum::from(0))).collect();
        let nulls: Vec<c_char> =
            args.iter().map(|a| if a.1.is_some() { b' ' } else { b'n' } as c_char).collect();
        // SAFETY: the arrays hold nargs entries and outlive the call, which copies the
        // parameters into the portal; an ERROR raises rather than returning NULL.
        let portal = unsafe {
            pg_sys::SPI_cursor_open_with_args(
                std::ptr::null(),
                sql.as_ptr(),
                args.len() as i32,
                types.as_mut_ptr(),
                values.as_mut_ptr(),
                nulls.as_ptr(),
                true,
                options,
            )
        };
        if portal.is_null() {
            return Err(AuditError::Internal(format!("could not open a cursor for {sql:?}")));
        }
        Ok(Cursor { portal })
    }
}

/// What a [`Receiver`] hands each row to: its values and nulls, in the
/// result's column order; an Err stops the query.
pub(crate) type RowFn<'a> = dyn FnMut(&[Datum], &[bool]) -> Result<()> + 'a;

/// As [`RowFn`], for [`Cursor::each`]: false stops the reading.
pub(crate) type RowStep<'a> = dyn FnMut(&[Datum], &[bool]) -> Result<bool> + 'a;

/// A receiver of result rows that hands each to a closure as its values and
/// nulls, straight from the executor's slot: no row is copied on the way.
/// PostgreSQL sees only `base`.
#[repr(C)]
struct Receiver<'a> {
    base: pg_sys::DestReceiver,
    f: &'a mut RowFn<'a>,
    error: Option<AuditError>,
}

impl<'a> Receiver<'a> {
    fn new(f: &'a mut RowFn<'a>) -> Receiver<'a> {
        // Nothing to set up or tear down (and nothing here can raise an ERROR).
        unsafe extern "C-unwind" fn startup(
            _: *mut pg_sys::DestReceiver,
            _: std::ffi::c_int,
            _: pg_sys::TupleDesc,
        ) {
        }
        unsafe extern "C-unwind" fn nothing(_: *mut pg_sys::DestReceiver) {}
        Receiver {
            base: pg_sys::DestReceiver {
                receiveSlot: Some(receive),
                rStartup: Some(startup),
                rShutdown: Some(nothing),
                rDestroy: Some(nothing),
                // Not DestSPI: SPI keeps no tuple table for a receiver of the caller's.
                mydest: pg_sys::CommandDest::DestNone,
            },
            f,
            error: None,
        }
    }

    /// What the closure returned, once the executor has stopped.
    fn outcome(&mut self) -> Result<()> {
        self.error.take().map_or(Ok(()), Err)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn receive(
    slot: *mut pg_sys::TupleTableSlot,
    this: *mut pg_sys::DestReceiver,
) -> bool {
    // SAFETY: `this` is the `base` of a Receiver handed to the executor, alive
    // while it runs; the slot is the query's result slot, whose values stay
    // valid until the next row.
    unsafe {
        let r = &mut *(this as *mut Receiver<'static>);
        let natts = (*(*slot).tts_tupleDescriptor).natts;
        if i32::from((*slot).tts_nvalid) < natts {
            pg_sys::slot_getsomeattrs_int(slot, natts);
        }
        let n = natts as usize;
        let values = std::slice::from_raw_parts((*slot).tts_values, n);
        let nulls = std::slice::from_raw_parts((*slot).tts_isnull, n);
        match (r.f)(values, nulls) {
            Ok(()) => true,
            Err(e) => {
                // Stops the executor; the caller returns the error.
                r.error = Some(e);
                false
            }
        }
    }
}

/// Runs `sql` read-only to its end, as the current user, on the active snapshot
/// (the one a read-only cursor opened meanwhile sees), handing each result row
/// to `f` as it comes. Unlike a cursor fetched in parts, the plan may use
/// parallel workers.
///
/// `f` runs inside the query, which holds the SPI connection's executor memory:
/// an SPI call it makes must be under a connection of its own (pgrx's
/// `Spi::connect`); [`Cursor::push`] makes none. `f` runs in the executor's
/// memory context, which lasts as long as the query: it must allocate in one
/// of its own.
pub(crate) fn stream(sql: &str, f: &mut RowFn<'_>) -> Result<()> {
    let sql = CString::new(sql).map_err(|_| AuditError::Internal("NUL in a query".into()))?;
    let mut r = Receiver::new(f);
    let options =
        pg_sys::SPIExecuteOptions { read_only: true, dest: &mut r.base, ..Default::default() };
    // SAFETY: connected to SPI (the caller's contract); the receiver outlives the
    // call, which runs the whole query; an ERROR raises rather than returning.
    let rc = unsafe { pg_sys::SPI_execute_extended(sql.as_ptr(), &options) };
    r.outcome()?;
    if rc < 0 {
        return Err(AuditError::Internal(format!(
            "SPI_execute_extended returned {rc} for {sql:?}"
        )));
    }
    Ok(())
}

impl Cursor {
    /// Fetches up to `n` rows, handing each to `f` as its values and nulls
    /// straight from the executor: no row is copied, and no SPI call is made
    /// (so this also works inside a [`stream`]ed query). `f` runs in the portal's memory context, which lasts as long as
    /// the cursor: it must allocate in one of its own. Returns how many rows there were.
    pub(crate) fn push(&mut self, n: i64, f: &mut RowFn<'_>) -> Result<usize> {
        let mut r = Receiver::new(f);
        // SAFETY: the portal is open (closed only by Drop) and not running; the
        // receiver outlives the call; an ERROR raises (and marks the portal failed).
        let count = unsafe {
            pg_sys::PortalRunFetch(
                self.portal,
                pg_sys::FetchDirection::FETCH_FORWARD,
                n as std::ffi::c_long,
                &mut r.base,
            )
        };
        r.outcome()?;
        Ok(count as usize)
    }
}

impl Cursor {
    /// Whether the cursor's columns are of `types`, in order: for a reader that
    /// takes the datums apart as those types (a column of audit.log changed
    /// under it must be an error, not a misread).
    pub(crate) fn has_types(&self, types: &[Oid]) -> bool {
        // SAFETY: an open portal; its tupDesc was set when it was started.
        unsafe {
            let desc = (*self.portal).tupDesc;
            !desc.is_null()
                && (*desc).natts as usize == types.len()
                && types
                    .iter()
                    .enumerate()
                    .all(|(i, t)| pg_sys::SPI_gettypeid(desc, i as i32 + 1) == *t)
        }
    }

    /// Every row to its end through [`Cursor::push`], `n` at a time, `f` running in
    /// `mem`, which is reset after each fetch: what `f` detoasts or allocates for a
    /// row lives until then. `f` returns false to stop (the rest of its fetch is
    /// passed over).
    pub(crate) fn each(&mut self, n: i64, mem: &BatchMemory, f: &mut RowStep<'_>) -> Result<()> {
        let mut more = true;
        while more {
            let got = self.push(n, &mut |v, nulls| {
                if more {
                    more = mem.run(|| f(v, nulls))?;
                }
                Ok(())
            })?;
            mem.reset();
            more &= got > 0;
        }
        Ok(())
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        // While an ERROR unwinds, transaction abort closes the portal itself.
        if !std::thread::panicking() {
            // SAFETY: the portal was opened by open() and is closed once.
            unsafe { pg_sys::SPI_cursor_close(self.portal) };
        }
    }
}

/// While alive, a snapshot taken now is the active one, so read-only cursors
/// opened meanwhile see what committed up to now, not up to the statement's start.
pub(crate) struct FreshSnapshot(());

impl FreshSnapshot {
    pub(crate) fn take() -> FreshSnapshot {
        // SAFETY: pushes a new snapshot onto the active stack; popped by Drop, or by
        // transaction abort when an ERROR unwinds.
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
        FreshSnapshot(())
    }
}

impl Drop for FreshSnapshot {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: pops exactly what take() pushed.
            unsafe { pg_sys::PopActiveSnapshot() };
        }
    }
}

/// A memory context reset after every batch: encoding a row allocates, and a
/// scan of a million rows must not keep them all. Its first block is big and
/// survives each reset, so a batch reuses the pages of the one before instead
/// of having fresh ones mapped (page faults were a third of verify_table's time).
pub(crate) struct BatchMemory {
    cxt: pg_sys::MemoryContext,
}

/// The block a batch context keeps across resets.
const KEPT_BLOCK: usize = 4 << 20;
/// The block a row's scratch context keeps: room for encoding an ordinary
/// row, so that most rows allocate nothing from the system.
const ROW_KEPT_BLOCK: usize = 64 << 10;

impl BatchMemory {
    pub(crate) fn new() -> BatchMemory {
        Self::keeping(c"audit_ext batch", KEPT_BLOCK)
    }

    fn keeping(name: &'static std::ffi::CStr, kept: usize) -> BatchMemory {
        // SAFETY: a child of the current context, deleted by Drop (or with its parent).
        let cxt = unsafe {
            pg_sys::AllocSetContextCreateExtended(
                pg_sys::CurrentMemoryContext,
                name.as_ptr(),
                kept,
                kept,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        };
        BatchMemory { cxt }
    }

    /// Runs `f` with this context current.
    pub(crate) fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        // SAFETY: switches to a live context and back, also when f unwinds (abort
        // resets CurrentMemoryContext itself, so the restore is only for Ok paths).
        let old = unsafe { pg_sys::MemoryContextSwitchTo(self.cxt) };
        let r = f();
        // SAFETY: as above.
        unsafe { pg_sys::MemoryContextSwitchTo(old) };
        r
    }

    /// Frees everything allocated in the context since the last reset.
    pub(crate) fn reset(&self) {
        // SAFETY: nothing allocated in the context is used after a batch.
        unsafe { pg_sys::MemoryContextReset(self.cxt) };
    }
}

impl Drop for BatchMemory {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: created in new(), deleted once.
            unsafe { pg_sys::MemoryContextDelete(self.cxt) };
        }
    }
}

/// A text datum's bytes, in the database encoding.
///
/// # Safety
/// `d` must be a valid, non-null text datum.
pub(crate) unsafe fn text_bytes(d: Datum) -> Vec<u8> {
    // SAFETY: forwarded; the copy is taken before anything is freed.
    unsafe { text_slice(d).to_vec() }
}

/// As [`text_bytes`], borrowed: valid while the datum is and, if it had to be
/// detoasted, while the current memory context is not reset.
///
/// # Safety
/// As [`text_bytes`].
pub(crate) unsafe fn text_slice<'a>(d: Datum) -> &'a [u8] {
    // SAFETY: detoasting a valid varlena (a no-op unless compressed or external).
    unsafe {
        let p = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
        std::slice::from_raw_parts(
            pgrx::varlena::vardata_any(p) as *const u8,
            pgrx::varlena::varsize_any_exhdr(p),
        )
    }
}

/// The live table, encoded as the trigger encodes its rows.
pub(crate) struct Encoder {
    cfg: Rc<RelConfig>,
    /// Where one row is encoded, reset after each: the output functions' and
    /// jsonb builder's garbage of a whole batch would take pages that the
    /// kernel zeroes anew for every batch (14% of baseline's time did).
    scratch: BatchMemory,
    /// The relation's attribute count, dropped ones included.
    natts: usize,
    /// The attributes [`Encoder::columns`] reads, in its order.
    attnums: Vec<i32>,
    secret: Option<Rc<[u8]>>,
    /// The alias the table is read under, and its key written on: a name none
    /// of its columns has, so that no reader can take one for the other.
    pub(crate) alias: String,
}

impl Encoder {
    pub(crate) fn new(rel: &PgRelation) -> Result<Encoder> {
        let ext = crate::ext::ext_state()?;
        // SAFETY: the relation is open (and locked) for the rest of the statement.
        let cfg = unsafe { crate::capture::cache::rel_config(rel.as_ptr(), ext.owner)? };
        let secret = if cfg.columns.iter().any(|c| c.redacted) {
            Some(crate::secret::key(&ext)?)
        } else {
            None
        };
        let desc = rel.tuple_desc();
        let names: Vec<String> =
            desc.iter().map(crate::db_text::att_name).collect::<Result<_>>()?;
        let mut alias = "r".to_string();
        while names.contains(&alias) {
            alias.push('_');
        }
        // What `alias.*` expands to: every attribute not dropped, in order.
        let attnums =
            desc.iter().filter(|a| !a.is_dropped()).map(|a| i32::from(a.attnum)).collect();
        let scratch = BatchMemory::keeping(c"audit_ext row", ROW_KEPT_BLOCK);
        Ok(Encoder { cfg, natts: desc.len(), attnums, secret, scratch, alias: quote_ident(&alias) })
    }

    /// The select-list entry that reads a row the way [`Encoder::encode`] takes
    /// it: its columns, not the whole-row value, which the executor would form
    /// as a tuple of its own for every row and the encoder take apart again.
    pub(crate) fn columns(&self) -> String {
        format!("{}.*", self.alias)
    }

    /// The names the log's rows carry for this table (the tracked table's).
    pub(crate) fn schema_name(&self) -> &[u8] {
        self.cfg.schema_name.to_bytes()
    }

    pub(crate) fn table_name(&self) -> &[u8] {
        self.cfg.table_name.to_bytes()
    }

    /// A row read by [`Encoder::columns`] (`values` and `nulls` hold those
    /// columns, in order) as the trigger would log it: its row_id and its image,
    /// a jsonb datum in the caller's memory context.
    /// Runs as the current user: output functions and casts are user code.
    ///
    /// # Safety
    /// `values` and `nulls` must be a row of [`Encoder::columns`], still valid.
    pub(crate) unsafe fn encode(
        &self,
        values: &[Datum],
        nulls: &[bool],
    ) -> Result<(Option<Vec<u8>>, Datum)> {
        // SAFETY: a plain read of the current context, which outlives this call.
        let caller = unsafe { pg_sys::CurrentMemoryContext };
        // SAFETY: forwarded from the caller.
        let (key, image) = self.scratch.run(|| unsafe { self.encode_here(values, nulls, true) })?;
        // SAFETY: the image is a plain jsonb varlena of the scratch context, copied
        // out before that is reset.
        let image = unsafe {
            let src = image.cast_mut_ptr::<pg_sys::varlena>();
            let len = pgrx::varlena::varsize_any(src);
            let dst = pg_sys::MemoryContextAlloc(caller, len);
            std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len);
            Datum::from(dst)
        };
        self.scratch.reset();
        Ok((key, image))
    }

    /// As [`Encoder::encode`], handing `f` the row's key (None for a NULL key)
    /// and its image as a jsonb datum of a scratch context, valid only for the
    /// call: for a reader that stores or compares the image at once, so nothing
    /// is copied.
    ///
    /// # Safety
    /// As [`Encoder::encode`].
    pub(crate) unsafe fn with_row<R>(
        &self,
        values: &[Datum],
        nulls: &[bool],
        f: impl FnOnce(Option<Vec<u8>>, Datum) -> Result<R>,
    ) -> Result<R> {
        // SAFETY: forwarded from the caller; the image lives until the reset below.
        let r = self.scratch.run(|| unsafe {
            let (key, image) = self.encode_here(values, nulls, true)?;
            f(key, image)
        });
        self.scratch.reset();
        r
    }

    /// As [`Encoder::encode`], for a reader that has the row's key already
    /// (verify_table reads it beside the row): hands `f` the image only, as the
    /// bytes of its whole jsonb varlena, valid for the call (nothing is copied).
    ///
    /// # Safety
    /// As [`Encoder::encode`].
    pub(crate) unsafe fn with_image<R>(
        &self,
        values: &[Datum],
        nulls: &[bool],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        // SAFETY: forwarded from the caller.
        let r = self.scratch.run(|| unsafe {
            let (_, image) = self.encode_here(values, nulls, false)?;
            let p = image.cast_mut_ptr::<pg_sys::varlena>();
            // A plain varlena of this context, read before it is reset.
            Ok(f(std::slice::from_raw_parts(p as *const u8, pgrx::varlena::varsize_any(p))))
        });
        self.scratch.reset();
        r
    }

    /// # Safety
    /// As [`Encoder::encode`]; the image is built in the current context. The
    /// key is made only if `with_key`.
    unsafe fn encode_here(
        &self,
        values: &[Datum],
        nulls: &[bool],
        with_key: bool,
    ) -> Result<(Option<Vec<u8>>, Datum)> {
        if values.len() != self.attnums.len() || nulls.len() != self.attnums.len() {
            return Err(AuditError::Internal(format!(
                "a row of {} columns, where {} were read",
                values.len(),
                self.attnums.len()
            )));
        }
        let row = Deformed::from_columns(self.natts, &self.attnums, values, nulls);
        // SAFETY: the row's datums are the relation's columns (the caller's contract).
        unsafe {
            let key = if with_key { row_key(&self.cfg, &row)? } else { None };
            let image = encode_row(&self.cfg, &row, self.secret.as_deref())?;
            Ok((key, image))
        }
    }
}
