//! audit.verify: recompute every retained row's hash, every block's root and
//! link, and optionally prove that an externally held digest is still in the chain.

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};
use std::ptr;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::{varlena, JsonB, PgRelation};

use crate::chain::hash::{self, BlockFields, RootBuilder, RowFields};
use crate::chain::jsonb_text;
use crate::chain::prune::{self, ChainBlock, Removed};
use crate::chain::seal::ZERO_HASH;
use crate::errors::{AuditError, OrRaise, Result};
use crate::live_rows::{BatchMemory, Cursor};
use crate::log::access::Col as AccessCol;
use crate::log::{self, Col, PG_EPOCH_OFFSET_US};
use crate::privilege::as_extension_owner;

struct Block {
    block_id: i64,
    from_id: i64,
    through_id: i64,
    first_id: Option<i64>,
    last_id: Option<i64>,
    row_count: i64,
    root: Vec<u8>,
    prev_hash: Vec<u8>,
    block_hash: Vec<u8>,
    sealed_us: i64,
    /// A retention record (kind 'prune'), not a block of rows.
    is_prune: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    pub ok: bool,
    pub blocks: i64,
    pub rows: i64,
    pub first_bad_id: Option<i64>,
    pub detail: String,
}

struct Failure(Option<i64>, String);

/// What a digest claims: the hash of one block.
pub struct DigestClaim {
    pub block_id: i64,
    pub block_hash: Vec<u8>,
}

pub fn parse_digest(d: &serde_json::Value) -> Result<DigestClaim> {
    let obj = d.as_object().ok_or_else(|| {
        AuditError::BadDigest("expected a JSON object from audit.digest()".into())
    })?;
    let block_id =
        obj.get("block_id").and_then(|v| v.as_i64()).filter(|&b| b > 0).ok_or_else(|| {
            AuditError::BadDigest("\"block_id\" must be a positive integer".into())
        })?;
    let hex_hash = obj
        .get("block_hash")
        .and_then(|v| v.as_str())
        .ok_or_else(|| AuditError::BadDigest("\"block_hash\" is missing".into()))?;
    let block_hash = hex::decode(hex_hash)
        .ok()
        .filter(|h| h.len() == 32)
        .ok_or_else(|| AuditError::BadDigest("\"block_hash\" must be 64 hex digits".into()))?;
    Ok(DigestClaim { block_id, block_hash })
}

fn load_blocks(current: bool) -> Result<Vec<Block>> {
    Spi::connect(|c| -> Result<Vec<Block>> {
        // Before ALTER EXTENSION UPDATE (0.1.0's tables) every block is a block of rows.
        let kind = if current { "kind OPERATOR(pg_catalog.=) 'prune'" } else { "false" };
        let rows = c.select(
            &format!(
                "SELECT block_id, from_id, through_id, first_id, last_id, row_count, root, prev_hash, block_hash, sealed_at,
                        {kind}
                   FROM audit.blocks ORDER BY block_id"
            ),
            None,
            &[],
        )?;
        let mut v = Vec::new();
        for r in rows {
            let sealed: Option<TimestampWithTimeZone> = r.get(10)?;
            v.push(Block {
                block_id: r.get(1)?.unwrap_or_default(),
                from_id: r.get(2)?.unwrap_or_default(),
                through_id: r.get(3)?.unwrap_or_default(),
                first_id: r.get(4)?,
                last_id: r.get(5)?,
                row_count: r.get(6)?.unwrap_or_default(),
                root: r.get(7)?.unwrap_or_default(),
                prev_hash: r.get(8)?.unwrap_or_default(),
                block_hash: r.get(9)?.unwrap_or_default(),
                sealed_us: sealed
                    .map(|s| pg_sys::TimestampTz::from(s) + PG_EPOCH_OFFSET_US)
                    .unwrap_or(i64::MIN),
                is_prune: r.get::<bool>(11)?.unwrap_or(false),
            });
        }
        Ok(v)
    })
}

fn check_chain(blocks: &[Block]) -> std::result::Result<(), Failure> {
    let mut prev: Vec<u8> = ZERO_HASH.to_vec();
    let mut from = 0i64;
    for (i, b) in blocks.iter().enumerate() {
        let expected_id = i as i64 + 1;
        if b.block_id != expected_id {
            return Err(Failure(
                b.first_id,
                format!("block {expected_id} is missing from the chain"),
            ));
        }
        if b.prev_hash != prev {
            return Err(Failure(
                b.first_id,
                format!(
                    "block {} is not linked to block {}: prev_hash differs",
                    b.block_id,
                    b.block_id - 1
                ),
            ));
        }
        // A block of rows covers the ids after the previous block; a retention record covers none.
        let range_ok = b.from_id == from
            && if b.is_prune { b.through_id == b.from_id } else { b.through_id > b.from_id };
        if !range_ok {
            return Err(Failure(
                b.first_id,
                format!(
                    "block {} does not cover the id range after block {}",
                    b.block_id,
                    b.block_id - 1
                ),
            ));
        }
        let fields = BlockFields {
            block_id: b.block_id,
            from_id: b.from_id,
            through_id: b.through_id,
            first_id: b.first_id,
            last_id: b.last_id,
            row_count: b.row_count,
            root: &b.root,
            prev_hash: &b.prev_hash,
            sealed_at_us: b.sealed_us,
        };
        let recomputed =
            if b.is_prune { hash::prune_block_hash(&fields) } else { hash::block_hash(&fields) };
        if recomputed.as_slice() != b.block_hash.as_slice() {
            return Err(Failure(
                b.first_id,
                format!(
                    "block {} was altered: its block_hash does not match its contents",
                    b.block_id
                ),
            ));
        }
        prev = b.block_hash.clone();
        from = b.through_id;
    }
    Ok(())
}

/// Accumulates one block's rows (present and pruned by retention) in id order.
struct BlockCheck {
    root: RootBuilder,
    ids_seen_first: Option<i64>,
}

impl BlockCheck {
    fn new() -> Self {
        BlockCheck { root: RootBuilder::new(), ids_seen_first: None }
    }
    fn push(&mut self, id: i64, h: &[u8]) {
        self.ids_seen_first.get_or_insert(id);
        self.root.push(id, h);
    }
}

/// Pruned rows with ids in (after, through]. Empty when the range is: BTreeMap::range
/// panics on a reversed range, and rows on both sides of a pruned stretch make one.
fn pruned_between(
    pruned: &BTreeMap<i64, Vec<u8>>,
    after: i64,
    through: i64,
) -> impl Iterator<Item = (&i64, &Vec<u8>)> {
    let r = if after < through {
        Some(pruned.range((std::ops::Bound::Excluded(after), std::ops::Bound::Included(through))))
    } else {
        None
    };
    r.into_iter().flatten()
}

fn finish_block(
    b: &Block,
    mut bc: BlockCheck,
    removed: &Removed,
    after: i64,
) -> std::result::Result<(), Failure> {
    if removed.emptied.contains_key(&b.block_id) {
        // Retention emptied it (its record checked out): its hash and links are verified,
        // and no row may have come back into its range.
        if bc.root.count() > 0 {
            return Err(Failure(
                bc.ids_seen_first,
                format!(
                    "block {}: row(s) were inserted into a sealed block that retention emptied",
                    b.block_id
                ),
            ));
        }
        return Ok(());
    }
    for (id, h) in pruned_between(&removed.pairs, after, b.through_id) {
        bc.push(*id, h);
    }
    let count = bc.root.count() as i64;
    let first_seen = bc.ids_seen_first;
    let root = bc.root.finish();
    if count < b.row_count {
        return Err(Failure(
            b.first_id,
            format!(
                "block {}: {} sealed row(s) were deleted (and not by retention)",
                b.block_id,
                b.row_count - count
            ),
        ));
    }
    if count > b.row_count {
        return Err(Failure(
            first_seen,
            format!(
                "block {}: {} row(s) were inserted into its sealed id range",
                b.block_id,
                count - b.row_count
            ),
        ));
    }
    if root.as_slice() != b.root.as_slice() {
        return Err(Failure(
            b.first_id,
            format!("block {}: sealed rows were changed, replaced or reordered (its root does not match)", b.block_id),
        ));
    }
    Ok(())
}

pub fn verify_impl(digest: Option<serde_json::Value>) -> Result<Report> {
    // This statement's own rows kept for a multi-insert are part of what it verifies.
    crate::log::batch::flush_before_read();
    let claim = digest.as_ref().filter(|d| !d.is_null()).map(parse_digest).transpose()?;
    as_extension_owner(|| {
        let current = crate::version::schema_is_current()?;
        let blocks = load_blocks(current)?;
        let mut report = Report { blocks: blocks.len() as i64, ..Default::default() };
        let fail = |mut r: Report, f: Failure| {
            r.ok = false;
            r.first_bad_id = f.0;
            r.detail = f.1;
            Ok(r)
        };
        if let Err(f) = check_chain(&blocks) {
            return fail(report, f);
        }
        if let Some(c) = &claim {
            match blocks.get((c.block_id - 1) as usize) {
                None => {
                    return fail(report, Failure(None, format!("the digest's block {} is no longer in the chain", c.block_id)))
                }
                Some(b) if b.block_hash != c.block_hash => {
                    return fail(
                        report,
                        Failure(b.first_id, format!("block {} differs from the digest: the chain was rewritten after the digest was taken", c.block_id)),
                    )
                }
                _ => {}
            }
        }
        let chain: Vec<ChainBlock> = blocks
            .iter()
            .map(|b| ChainBlock {
                block_id: b.block_id,
                is_prune: b.is_prune,
                from_id: b.from_id,
                through_id: b.through_id,
                row_count: b.row_count,
                root: b.root.clone(),
                first_id: b.first_id,
            })
            .collect();
        let checked = if current {
            prune::check(&chain, claim.as_ref().map(|c| c.block_id))?
        } else {
            prune::legacy()?
        };
        let removed = match checked {
            Ok(r) => r,
            Err((id, why)) => return fail(report, Failure(id, why)),
        };
        // The walk is over blocks of rows; retention records hold none.
        let blocks: Vec<&Block> = blocks.iter().filter(|b| !b.is_prune).collect();
        let (outcome, walked) =
            Spi::connect(|_| -> Result<(std::result::Result<(), Failure>, IdWalk)> {
                let (mut rows, reads, mut ids) = open_log_cursors(current)?;
                // Pass 1, in storage order: recompute every row's hash. The walk below stops at the
                // first failure in id order, so only the lowest id whose hash differs matters.
                let mut bad = BadRows::default();
                let mut texts = JsonbText::new_set();
                let mem = BatchMemory::new();
                typed(&rows, &log::COLUMN_TYPES)?;
                rows.each(FETCH, &mem, &mut |v, n| {
                    let f = row_fields(v, n, &mut texts)?;
                    let stored = or_empty(v, n, Col::RowHash.at());
                    if hash::row_hash(&f).as_slice() != stored {
                        bad.note(f.id, stored);
                    }
                    Ok(true)
                })?;
                drop(rows);
                if let Some(mut reads) = reads {
                    let [si, params, _] = &mut texts;
                    typed(&reads, &log::access::COLUMN_TYPES)?;
                    reads.each(FETCH, &mem, &mut |v, n| {
                        let f = access_fields(v, n, si, params)?;
                        let stored = or_empty(v, n, AccessCol::RowHash.at());
                        if hash::access_hash(&f).as_slice() != stored {
                            bad.note(f.id, stored);
                        }
                        Ok(true)
                    })?;
                }
                // Pass 2, in id order over (id, row_hash) only: duplicates, hashes, blocks and roots.
                let mut walk = IdWalk::new(&blocks, &removed, bad);
                let mut failure = None;
                typed(&ids, &IDS_TYPES)?;
                ids.each(
                    FETCH,
                    &mem,
                    &mut |v, n| match walk.step(int8(v, n, 0), or_empty(v, n, 1)) {
                        Ok(()) => Ok(true),
                        Err(f) => {
                            failure = Some(f);
                            Ok(false)
                        }
                    },
                )?;
                let outcome = match failure {
                    Some(f) => Err(f),
                    None => walk.finish(),
                };
                Ok((outcome, walk))
            })?;
        report.rows = walked.rows;
        let unsealed = walked.unsealed;
        if let Err(f) = outcome {
            return fail(report, f);
        }
        report.ok = true;
        report.detail = format!(
            "ok: {} block(s) and {} row(s) verified, {} row(s) not sealed yet{}",
            report.blocks,
            report.rows,
            unsealed,
            if claim.is_some() { "; the digest's block is in the chain unchanged" } else { "" }
        );
        Ok(report)
    })
}

/// Verify's second pass: audit.log's (id, row_hash) pairs in id order, against the
/// blocks of rows. It finds duplicated ids, rows whose hash pass 1 found wrong, and
/// rows outside every block, and rebuilds each block's root (retention's removed
/// pairs filled back in where they were) for finish_block to compare.
struct IdWalk<'a> {
    blocks: &'a [&'a Block],
    removed: &'a Removed,
    bad: BadRows,
    /// The block the walk is in, and the root being rebuilt for it.
    bi: usize,
    bc: BlockCheck,
    /// The highest id pushed into a root so far (rows or removed pairs).
    last_pushed: i64,
    prev_id: Option<i64>,
    rows: i64,
    unsealed: i64,
}

impl<'a> IdWalk<'a> {
    fn new(blocks: &'a [&'a Block], removed: &'a Removed, bad: BadRows) -> Self {
        IdWalk {
            blocks,
            removed,
            bad,
            bi: 0,
            bc: BlockCheck::new(),
            last_pushed: blocks.first().map(|b| b.from_id).unwrap_or(0),
            prev_id: None,
            rows: 0,
            unsealed: 0,
        }
    }

    fn step(&mut self, id: i64, stored: &[u8]) -> std::result::Result<(), Failure> {
        if self.prev_id == Some(id) {
            return Err(Failure(Some(id), format!("row id {id} appears more than once")));
        }
        self.prev_id = Some(id);
        if self.bad.contains(id, stored) {
            return Err(Failure(
                Some(id),
                format!("row {id} was altered: its contents do not match its row_hash"),
            ));
        }
        self.rows += 1;
        while self.bi < self.blocks.len() && id > self.blocks[self.bi].through_id {
            self.finish_current()?;
        }
        if self.bi >= self.blocks.len() {
            self.unsealed += 1;
        } else if id > self.blocks[self.bi].from_id {
            for (pid, h) in pruned_between(&self.removed.pairs, self.last_pushed, id - 1) {
                self.bc.push(*pid, h);
            }
            self.bc.push(id, stored);
            self.last_pushed = id;
        } else {
            return Err(Failure(
                Some(id),
                format!("row {id} lies outside every sealed block's range"),
            ));
        }
        Ok(())
    }

    /// Checks the block the walk is in and moves to the next.
    fn finish_current(&mut self) -> std::result::Result<(), Failure> {
        let b = self.blocks[self.bi];
        finish_block(
            b,
            std::mem::replace(&mut self.bc, BlockCheck::new()),
            self.removed,
            self.last_pushed,
        )?;
        self.last_pushed = b.through_id;
        self.bi += 1;
        Ok(())
    }

    /// After the last row: the blocks no row reached must check out too.
    fn finish(&mut self) -> std::result::Result<(), Failure> {
        while self.bi < self.blocks.len() {
            self.finish_current()?;
        }
        Ok(())
    }
}

// ---- Reading audit.log: the executor's datums, no per-cell conversion ---------------------------------

/// Rows per fetch from each cursor; each batch is freed before the next.
const FETCH: i64 = 1_000;

/// Pass 2: the walk in id order needs only these, so the sort stays narrow.
fn ids_sql(current: bool) -> std::ffi::CString {
    std::ffi::CString::new(format!(
        "SELECT id, row_hash FROM {} ORDER BY id",
        log::chained_rows(current)
    ))
    .expect("no NUL")
}
const IDS_TYPES: [pg_sys::Oid; 2] = [pg_sys::INT8OID, pg_sys::BYTEAOID];

/// Opens both passes over audit.log on one snapshot, so that the rows pass 1 hashes
/// are exactly the rows pass 2 walks. It is the snapshot a single SPI cursor opened
/// here would get: pgrx opens read-only (the active snapshot) until the transaction
/// has written, and read-write (a fresh snapshot) after.
fn open_log_cursors(current: bool) -> Result<(Cursor, Option<Cursor>, Cursor)> {
    // SAFETY: reads this backend's own transaction state.
    let wrote = unsafe { pg_sys::GetCurrentTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
    if wrote {
        // SAFETY: what SPI_cursor_open does for a read-write cursor, done once for both
        // cursors; popped below. On ERROR, abort pops it.
        unsafe {
            pg_sys::CommandCounterIncrement();
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        }
    }
    let rows = open(&log::select_all_sql());
    let reads = current.then(|| open(&log::access::select_all_sql()));
    let ids = open(&ids_sql(current));
    if wrote {
        // SAFETY: pops the snapshot pushed above; each portal holds its own registered copy.
        unsafe { pg_sys::PopActiveSnapshot() };
    }
    Ok((rows?, reads.transpose()?, ids?))
}

/// A cursor on the active snapshot (read-only): the one open_log_cursors pushed,
/// or the statement's.
fn open(sql: &CStr) -> Result<Cursor> {
    let sql = sql.to_str().map_err(|_| AuditError::Internal("a query that is not UTF-8".into()))?;
    Cursor::open(sql, &[])
}

/// The decoders below read each column as these types: a column of the log
/// changed under them is an error, not a misread.
fn typed(cur: &Cursor, types: &[pg_sys::Oid]) -> Result<()> {
    if cur.has_types(types) {
        Ok(())
    } else {
        Err(AuditError::Internal("audit.log does not have the columns audit.verify expects".into()))
    }
}

/// The lowest id whose recomputed hash differs from its stored row_hash, and those
/// rows' stored hashes (an id may be duplicated): the walk in id order stops there.
#[derive(Default)]
struct BadRows {
    id: Option<i64>,
    stored: Vec<Vec<u8>>,
}

impl BadRows {
    fn note(&mut self, id: i64, stored: &[u8]) {
        match self.id {
            Some(b) if b < id => {}
            Some(b) if b == id => self.stored.push(stored.to_vec()),
            _ => {
                self.id = Some(id);
                self.stored = vec![stored.to_vec()];
            }
        }
    }
    fn contains(&self, id: i64, stored: &[u8]) -> bool {
        self.id == Some(id) && self.stored.iter().any(|s| s.as_slice() == stored)
    }
}

/// A reused buffer for jsonb_out's text of a jsonb value.
struct JsonbText {
    buf: Vec<u8>,
    /// For values jsonb_text::write leaves to PostgreSQL (and the debug cross-check).
    pg: pg_sys::StringInfo,
}

impl JsonbText {
    /// Call outside Cursor::each: the StringInfos live in the current (SPI) memory context.
    fn new_set() -> [JsonbText; 3] {
        // SAFETY: makeStringInfo pallocs in CurrentMemoryContext or raises.
        std::array::from_fn(|_| JsonbText {
            buf: Vec::new(),
            pg: unsafe { pg_sys::makeStringInfo() },
        })
    }

    /// The text of jsonb column `i` (None when NULL): the very bytes `::text` gives
    /// (jsonb_out, that is JsonbToCString), written by jsonb_text::write, or by
    /// JsonbToCString itself for anything write does not handle.
    fn of<'a>(
        &'a mut self,
        v: &'a [pg_sys::Datum],
        n: &[bool],
        i: usize,
    ) -> Result<Option<&'a [u8]>> {
        if n[i] {
            return Ok(None);
        }
        // SAFETY: a non-null jsonb datum of a live tuple (check_types). Unless it is plain
        // (4-byte header, inline, uncompressed), pg_detoast_datum copies it so into the batch
        // context. The slice is its root container, VARSIZE - 4 bytes after the header.
        let (jb, root) = unsafe {
            let mut p = v[i].cast_mut_ptr::<pg_sys::varlena>();
            if !varlena::varatt_is_4b_u(p) {
                p = pg_sys::pg_detoast_datum(p);
            }
            let size = varlena::varsize_4b(p);
            (
                p.cast::<pg_sys::Jsonb>(),
                std::slice::from_raw_parts(p.cast::<u8>().add(4), size.saturating_sub(4)),
            )
        };
        self.buf.clear();
        if jsonb_text::write(&mut self.buf, root).is_none() {
            // write may have written part of it.
            self.buf.clear();
            self.buf.extend_from_slice(pg_text(self.pg, jb));
        } else if cfg!(debug_assertions) {
            let text = pg_text(self.pg, jb);
            if text != self.buf {
                return Err(AuditError::Internal(format!(
                    "jsonb text differs from jsonb_out: {:?} vs {:?}",
                    String::from_utf8_lossy(&self.buf),
                    String::from_utf8_lossy(text)
                )));
            }
        }
        Ok(Some(&self.buf))
    }
}

/// JsonbToCString's text of a detoasted jsonb, in the reused StringInfo `out`
/// (valid until its next use).
fn pg_text<'a>(out: pg_sys::StringInfo, jb: *mut pg_sys::Jsonb) -> &'a [u8] {
    // SAFETY: jb is a detoasted jsonb (see JsonbText::of); out is a valid StringInfo
    // (JsonbText::new_set) that JsonbToCString appends to after we empty it.
    unsafe {
        (*out).len = 0;
        *(*out).data = 0;
        (*out).cursor = 0;
        pg_sys::JsonbToCString(out, &mut (*jb).root, varlena::varsize_4b(jb.cast()) as i32);
        std::slice::from_raw_parts((*out).data as *const u8, (*out).len as usize)
    }
}

/// The bytes of a text or bytea datum.
fn varlena_bytes<'a>(d: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: a non-null varlena datum of a live tuple (or array). Out-of-line or compressed
    // values are detoasted into the batch context; short (1-byte header) ones are read as
    // they are. Callers only keep the slice while the batch lives (see Cursor::each).
    unsafe {
        let mut p = d.cast_mut_ptr::<pg_sys::varlena>();
        if varlena::varatt_is_1b_e(p) || varlena::varatt_is_4b_c(p) {
            p = pg_sys::pg_detoast_datum_packed(p);
        }
        varlena::varlena_to_byte_slice(p)
    }
}

fn int8(v: &[pg_sys::Datum], n: &[bool], i: usize) -> i64 {
    if n[i] {
        0
    } else {
        v[i].value() as i64
    }
}

/// Text as the hash covers it: its bytes in the database encoding.
fn text<'a>(v: &'a [pg_sys::Datum], n: &[bool], i: usize) -> Option<&'a [u8]> {
    (!n[i]).then(|| varlena_bytes(v[i]))
}

fn or_empty<'a>(v: &'a [pg_sys::Datum], n: &[bool], i: usize) -> &'a [u8] {
    if n[i] {
        &[]
    } else {
        varlena_bytes(v[i])
    }
}

fn text_array<'a>(v: &'a [pg_sys::Datum], n: &[bool], i: usize) -> Option<Vec<Option<&'a [u8]>>> {
    if n[i] {
        return None;
    }
    let (mut elems, mut enulls, mut count) = (ptr::null_mut(), ptr::null_mut(), 0);
    // SAFETY: a non-null text[] datum (check_types), detoasted like DatumGetArrayTypeP does;
    // deconstruct_array allocates its outputs in the batch context.
    unsafe {
        let arr = pg_sys::pg_detoast_datum(v[i].cast_mut_ptr()).cast::<pg_sys::ArrayType>();
        pg_sys::deconstruct_array(
            arr,
            pg_sys::TEXTOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as c_char,
            &mut elems,
            &mut enulls,
            &mut count,
        );
    }
    (0..count.max(0) as usize)
        .map(|k| {
            // SAFETY: deconstruct_array filled `count` datums and null flags.
            let (d, null) = unsafe { (*elems.add(k), *enulls.add(k)) };
            (!null).then(|| varlena_bytes(d))
        })
        .collect::<Vec<_>>()
        .into()
}

/// One row of audit.log (all columns, table order) as the row hash sees it.
fn row_fields<'a>(
    v: &'a [pg_sys::Datum],
    n: &'a [bool],
    t: &'a mut [JsonbText; 3],
) -> Result<RowFields<'a>> {
    let [old, new, si] = t;
    let at = Col::ChangedAt.at();
    Ok(RowFields {
        id: int8(v, n, Col::Id.at()),
        changed_at_us: if n[at] { i64::MIN } else { v[at].value() as i64 + PG_EPOCH_OFFSET_US },
        txid: int8(v, n, Col::Txid.at()),
        schema_name: text(v, n, Col::SchemaName.at()).unwrap_or_default(),
        table_name: text(v, n, Col::TableName.at()).unwrap_or_default(),
        operation: text(v, n, Col::Operation.at()).unwrap_or_default(),
        row_id: text(v, n, Col::RowId.at()),
        old_values: old.of(v, n, Col::OldValues.at())?,
        new_values: new.of(v, n, Col::NewValues.at())?,
        changed_fields: text_array(v, n, Col::ChangedFields.at()),
        changed_by: text(v, n, Col::ChangedBy.at()).unwrap_or_default(),
        db_user: text(v, n, Col::DbUser.at()).unwrap_or_default(),
        session_info: si.of(v, n, Col::SessionInfo.at())?,
        old_row_id: text(v, n, Col::OldRowId.at()),
    })
}

/// 0.1.0's `audit.verify(digest jsonb)` calls this symbol (verify_wrapper) with
/// one argument: between a package upgrade and `ALTER EXTENSION audit_ext
/// UPDATE`, the new library serves the old definition. 0.2.0's two-argument
/// function has a symbol of its own, so no SQL is made for this one.
#[pg_extern(
    stable,
    parallel_safe,
    sql = "-- audit.verify(jsonb) of 0.1.0 calls verify_wrapper; 0.2.0 defines audit.verify(jsonb, regclass[])"
)]
fn verify(
    digest: Option<JsonB>,
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(blocks, i64),
        name!(rows, i64),
        name!(first_bad_id, Option<i64>),
        name!(detail, crate::db_text::DbText),
    ),
> {
    verify_with_tables(digest, None)
}

// The SQL is written out because pgrx has no regclass[] argument type: the
// tables arrive as their oids. Keep it equal to sql/audit_ext--0.1.0--0.2.0.sql.
#[pg_extern(
    stable,
    parallel_safe,
    sql = r#"
CREATE FUNCTION "verify"(
	"digest" jsonb DEFAULT NULL,
	"tables" regclass[] DEFAULT NULL
) RETURNS TABLE (
	"ok" bool,
	"blocks" bigint,
	"rows" bigint,
	"first_bad_id" bigint,
	"detail" TEXT
)
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'verify_with_tables_wrapper';
"#
)]
fn verify_with_tables(
    digest: Option<JsonB>,
    tables: Option<Vec<Option<pg_sys::Oid>>>,
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(blocks, i64),
        name!(rows, i64),
        name!(first_bad_id, Option<i64>),
        name!(detail, crate::db_text::DbText),
    ),
> {
    let mut r = verify_impl(digest.map(|j| j.0)).or_raise();
    // The tables as well (audit.verify_table), each as the caller: the log's
    // proof and the tables' in one answer.
    let tables: Vec<PgRelation> = tables
        .unwrap_or_default()
        .into_iter()
        .flatten()
        // SAFETY: each oid came in as a regclass; with_lock opens and locks it (or raises).
        .map(|oid| unsafe {
            PgRelation::with_lock(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE)
        })
        .collect();
    if !tables.is_empty() {
        let _q = crate::quiet::Quiet::enter();
        let (ok, detail) = crate::verify_table::verify_tables(tables).or_raise();
        r.ok &= ok;
        r.detail = format!("{}; tables: {detail}", r.detail);
    }
    // The tables' part names their rows in the database's encoding (crate::db_text).
    TableIterator::once((
        r.ok,
        r.blocks,
        r.rows,
        r.first_bad_id,
        crate::db_text::DbText::from_rust(&r.detail),
    ))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    /// jsonb_in of `text`, in the current memory context.
    fn jsonb(text: &str) -> pg_sys::Datum {
        let c = std::ffi::CString::new(text).unwrap();
        // SAFETY: jsonb_in of a C string; the result is a palloc'd jsonb or an ERROR.
        unsafe {
            pgrx::direct_function_call_as_datum(
                pg_sys::jsonb_in,
                &[Some(pg_sys::Datum::from(c.as_ptr()))],
            )
        }
        .unwrap()
    }

    #[pg_test]
    fn jsonb_text_matches_jsonb_out() {
        let many_keys = format!(
            "{{{}}}",
            (0..100).map(|i| format!("\"k{i:03}\": {i}.{i}")).collect::<Vec<_>>().join(", ")
        );
        let many_elems = format!(
            "[{}]",
            (0..100).map(|i| format!("\"e{i}\\n\"")).collect::<Vec<_>>().join(", ")
        );
        let long_string = format!("\"{}\"", "ab\\\"c\\\\d\\u0001é😀 ".repeat(2000));
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        // Numbers of every header form (short and long, negative weights, scales
        // past a digit group), which the writer formats itself.
        let mut seed = 0x9e37_79b9_u64;
        let mut numbers: Vec<String> = [
            "1e300",
            "-1e-100",
            "1.5e-70",
            "123.456e200",
            "0.0001",
            "-0.00010",
            "10000",
            "9999.9999",
            "100000000.000000001",
            "0.10000000000000000000000000000000000000000000000000000000000000000001",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for _ in 0..2000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mantissa = (seed >> 20) % 10_u64.pow(1 + (seed % 15) as u32);
            let exp = ((seed >> 8) % 200) as i64 - 100;
            let sign = if seed & 1 == 0 { "" } else { "-" };
            numbers.push(format!("{sign}{mantissa}.{:0>3}e{exp}", (seed >> 40) % 1000));
        }
        let numbers = format!("[{}]", numbers.join(", "));
        let cases: Vec<&str> = vec![
            "null",
            "true",
            "false",
            "0",
            "-0",
            "1",
            "-0.5e-10",
            "1e100",
            "123456789012345678901234567890.123456789000",
            "\"\"",
            "\"a\\\"b\\\\c\\n\\t\\r\\b\\f\\u0001\\u001f\\u007f é 😀 /\"",
            "[]",
            "{}",
            "[null, true, false, 1.50, \"x\", [], {}]",
            "[1, [2, [3, {}]], {\"a\": []}]",
            "{\"b\": 1, \"a\": {\"c\": null, \"d\": [true, false]}, \"\": \"\", \"aa\": 2.000}",
            "{\"k\\\"ey\\n\": {\"x\": [1, {\"y\": \"z\"}]}}",
            &many_keys,
            &many_elems,
            &long_string,
            &deep,
            &numbers,
        ];
        let [mut t, ..] = JsonbText::new_set();
        for case in cases {
            let d = jsonb(case);
            // SAFETY: d is a freshly made, plain (4-byte header) jsonb.
            let (jb, root) = unsafe {
                let p = d.cast_mut_ptr::<pg_sys::varlena>();
                (
                    p.cast::<pg_sys::Jsonb>(),
                    std::slice::from_raw_parts(p.cast::<u8>().add(4), varlena::varsize_4b(p) - 4),
                )
            };
            let expected = pg_text(t.pg, jb).to_vec();
            let mut ours = Vec::new();
            let handled = jsonb_text::write(&mut ours, root).is_some();
            assert_eq!(handled, case != deep, "{case}");
            if handled {
                assert_eq!(
                    String::from_utf8_lossy(&ours),
                    String::from_utf8_lossy(&expected),
                    "{case}"
                );
            }
            // And through the column decoder, which falls back to PostgreSQL where needed.
            let got = t.of(&[d], &[false], 0).unwrap().unwrap().to_vec();
            assert_eq!(got, expected, "{case}");
        }
        assert_eq!(t.of(&[pg_sys::Datum::from(0usize)], &[true], 0).unwrap(), None);
    }
}

/// One row of audit.access_log (all columns, table order) as its hash sees it.
fn access_fields<'a>(
    v: &'a [pg_sys::Datum],
    n: &'a [bool],
    si: &'a mut JsonbText,
    params: &'a mut JsonbText,
) -> Result<hash::AccessFields<'a>> {
    let at = AccessCol::AccessedAt.at();
    let opt_int = |i: usize| (!n[i]).then(|| int8(v, n, i));
    Ok(hash::AccessFields {
        id: int8(v, n, AccessCol::Id.at()),
        accessed_at_us: if n[at] { i64::MIN } else { v[at].value() as i64 + PG_EPOCH_OFFSET_US },
        schema_name: text(v, n, AccessCol::SchemaName.at()).unwrap_or_default(),
        table_name: text(v, n, AccessCol::TableName.at()).unwrap_or_default(),
        command: text(v, n, AccessCol::Command.at()).unwrap_or_default(),
        columns: text_array(v, n, AccessCol::Columns.at()),
        rows: opt_int(AccessCol::Rows.at()),
        outcome: text(v, n, AccessCol::Outcome.at()).unwrap_or_default(),
        sqlstate: text(v, n, AccessCol::Sqlstate.at()),
        accessed_by: text(v, n, AccessCol::AccessedBy.at()).unwrap_or_default(),
        db_user: text(v, n, AccessCol::DbUser.at()).unwrap_or_default(),
        role: text(v, n, AccessCol::Role.at()).unwrap_or_default(),
        txid: opt_int(AccessCol::Txid.at()),
        session_info: si.of(v, n, AccessCol::SessionInfo.at())?,
        query_id: opt_int(AccessCol::QueryId.at()),
        statement: text(v, n, AccessCol::Statement.at()),
        parameters: params.of(v, n, AccessCol::Parameters.at())?,
        backend_pid: if n[AccessCol::BackendPid.at()] {
            0
        } else {
            i64::from(v[AccessCol::BackendPid.at()].value() as i32)
        },
    })
}
