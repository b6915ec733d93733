//! audit.verify: recompute every retained row's hash, every block's root and
//! link, and optionally prove that an externally held digest is still in the chain.

use std::collections::{BTreeMap, HashSet};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::capture::PG_EPOCH_OFFSET_US;
use crate::chain::hash::{self, BlockFields, RootBuilder, RowFields};
use crate::chain::seal::ZERO_HASH;
use crate::errors::{AuditError, OrRaise, Result};
use crate::privilege::as_extension_owner;

const FETCH: i64 = 10_000;

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
    let obj = d.as_object().ok_or_else(|| AuditError::BadDigest("expected a JSON object from audit.digest()".into()))?;
    let block_id = obj
        .get("block_id")
        .and_then(|v| v.as_i64())
        .filter(|&b| b > 0)
        .ok_or_else(|| AuditError::BadDigest("\"block_id\" must be a positive integer".into()))?;
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

fn load_blocks() -> Result<Vec<Block>> {
    Spi::connect(|c| -> Result<Vec<Block>> {
        let rows = c.select(
            "SELECT block_id, from_id, through_id, first_id, last_id, row_count, root, prev_hash, block_hash, sealed_at
               FROM audit.blocks ORDER BY block_id",
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
                sealed_us: sealed.map(|s| pg_sys::TimestampTz::from(s) + PG_EPOCH_OFFSET_US).unwrap_or(i64::MIN),
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
            return Err(Failure(b.first_id, format!("block {expected_id} is missing from the chain")));
        }
        if b.prev_hash != prev {
            return Err(Failure(b.first_id, format!("block {} is not linked to block {}: prev_hash differs", b.block_id, b.block_id - 1)));
        }
        if b.from_id != from || b.through_id <= b.from_id {
            return Err(Failure(b.first_id, format!("block {} does not cover the id range after block {}", b.block_id, b.block_id - 1)));
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
        if hash::block_hash(&fields).as_slice() != b.block_hash.as_slice() {
            return Err(Failure(b.first_id, format!("block {} was altered: its block_hash does not match its contents", b.block_id)));
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

fn finish_block(b: &Block, mut bc: BlockCheck, pruned: &BTreeMap<i64, Vec<u8>>, after: i64, pruned_blocks: &HashSet<i64>) -> std::result::Result<(), Failure> {
    for (id, h) in pruned.range(after + 1..=b.through_id) {
        bc.push(*id, h);
    }
    if pruned_blocks.contains(&b.block_id) {
        return Ok(());
    }
    let count = bc.root.count() as i64;
    let first_seen = bc.ids_seen_first;
    let root = bc.root.finish();
    if count < b.row_count {
        return Err(Failure(
            b.first_id,
            format!("block {}: {} sealed row(s) were deleted (and not by retention)", b.block_id, b.row_count - count),
        ));
    }
    if count > b.row_count {
        return Err(Failure(
            first_seen,
            format!("block {}: {} row(s) were inserted into its sealed id range", b.block_id, count - b.row_count),
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
    let claim = digest.as_ref().filter(|d| !d.is_null()).map(parse_digest).transpose()?;
    as_extension_owner(|| {
        let blocks = load_blocks()?;
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
        let pruned: BTreeMap<i64, Vec<u8>> = Spi::connect(|c| -> Result<BTreeMap<i64, Vec<u8>>> {
            let mut m = BTreeMap::new();
            for r in c.select("SELECT id, row_hash FROM audit.pruned", None, &[])? {
                m.insert(r.get::<i64>(1)?.unwrap_or_default(), r.get::<Vec<u8>>(2)?.unwrap_or_default());
            }
            Ok(m)
        })?;
        let pruned_blocks: HashSet<i64> = Spi::connect(|c| -> Result<HashSet<i64>> {
            let mut s = HashSet::new();
            for r in c.select("SELECT block_id FROM audit.pruned_blocks", None, &[])? {
                s.insert(r.get::<i64>(1)?.unwrap_or_default());
            }
            Ok(s)
        })?;

        let mut bi = 0usize;
        let mut bc = BlockCheck::new();
        let mut last_pushed = blocks.first().map(|b| b.from_id).unwrap_or(0);
        let mut unsealed = 0i64;
        let outcome = Spi::connect(|c| -> Result<std::result::Result<(), Failure>> {
            let mut cur = c.open_cursor(
                "SELECT id, changed_at, txid, schema_name, table_name, operation, row_id, old_values::pg_catalog.text,
                        new_values::pg_catalog.text, changed_fields, changed_by, db_user,
                        session_info::pg_catalog.text, old_row_id, row_hash
                   FROM audit.log ORDER BY id",
                &[],
            );
            let mut prev_id: Option<i64> = None;
            loop {
                let table = cur.fetch(FETCH)?;
                if table.is_empty() {
                    break;
                }
                for r in table {
                    let id: i64 = r.get(1)?.unwrap_or_default();
                    let at: Option<TimestampWithTimeZone> = r.get(2)?;
                    let schema: String = r.get(4)?.unwrap_or_default();
                    let tname: String = r.get(5)?.unwrap_or_default();
                    let op: String = r.get(6)?.unwrap_or_default();
                    let row_id: Option<String> = r.get(7)?;
                    let old: Option<String> = r.get(8)?;
                    let new: Option<String> = r.get(9)?;
                    let fields: Option<Vec<Option<String>>> = r.get(10)?;
                    let by: String = r.get(11)?.unwrap_or_default();
                    let dbu: String = r.get(12)?.unwrap_or_default();
                    let si: Option<String> = r.get(13)?;
                    let old_row_id: Option<String> = r.get(14)?;
                    let stored: Vec<u8> = r.get(15)?.unwrap_or_default();
                    if prev_id == Some(id) {
                        return Ok(Err(Failure(Some(id), format!("row id {id} appears more than once"))));
                    }
                    prev_id = Some(id);
                    let f = RowFields {
                        id,
                        changed_at_us: at.map(|a| pg_sys::TimestampTz::from(a) + PG_EPOCH_OFFSET_US).unwrap_or(i64::MIN),
                        txid: r.get::<i64>(3)?.unwrap_or_default(),
                        schema_name: &schema,
                        table_name: &tname,
                        operation: &op,
                        row_id: row_id.as_deref(),
                        old_values: old.as_deref(),
                        new_values: new.as_deref(),
                        changed_fields: fields.as_ref().map(|v| v.iter().map(|s| s.as_deref()).collect()),
                        changed_by: &by,
                        db_user: &dbu,
                        session_info: si.as_deref(),
                        old_row_id: old_row_id.as_deref(),
                    };
                    if hash::row_hash(&f).as_slice() != stored.as_slice() {
                        return Ok(Err(Failure(Some(id), format!("row {id} was altered: its contents do not match its row_hash"))));
                    }
                    report.rows += 1;
                    while bi < blocks.len() && id > blocks[bi].through_id {
                        if let Err(e) = finish_block(&blocks[bi], std::mem::replace(&mut bc, BlockCheck::new()), &pruned, last_pushed, &pruned_blocks) {
                            return Ok(Err(e));
                        }
                        last_pushed = blocks[bi].through_id;
                        bi += 1;
                    }
                    if bi < blocks.len() && id > blocks[bi].from_id {
                        for (pid, h) in pruned.range(last_pushed + 1..id) {
                            bc.push(*pid, h);
                        }
                        bc.push(id, &stored);
                        last_pushed = id;
                    } else if bi >= blocks.len() {
                        unsealed += 1;
                    } else {
                        return Ok(Err(Failure(Some(id), format!("row {id} lies outside every sealed block's range"))));
                    }
                }
            }
            while bi < blocks.len() {
                if let Err(e) = finish_block(&blocks[bi], std::mem::replace(&mut bc, BlockCheck::new()), &pruned, last_pushed, &pruned_blocks) {
                    return Ok(Err(e));
                }
                last_pushed = blocks[bi].through_id;
                bi += 1;
            }
            Ok(Ok(()))
        })?;
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

#[pg_extern(stable, parallel_safe)]
fn verify(
    digest: default!(Option<JsonB>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(blocks, i64),
        name!(rows, i64),
        name!(first_bad_id, Option<i64>),
        name!(detail, String),
    ),
> {
    let r = verify_impl(digest.map(|j| j.0)).or_raise();
    TableIterator::once((r.ok, r.blocks, r.rows, r.first_bad_id, r.detail))
}
