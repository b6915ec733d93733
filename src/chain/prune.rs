//! What retention removes, committed into the chain.
//!
//! Verify recomputes a block's root from its rows, and for rows that retention
//! removed it needs their (id, row_hash). Those pairs, and the fact that a
//! block is gone altogether, are bookkeeping a superuser can edit; so each
//! retention run appends a **retention record** to the chain: a block of kind
//! 'prune' that covers no new ids, whose root commits, for every data block it
//! touched, how many rows it removed, the hash of their (id, row_hash) pairs,
//! and whether the block is now empty (audit.prune_parts). Verify recomputes
//! those roots, checks the kept pairs against them, and, given a digest,
//! refuses any removal of rows the digest covers that was recorded after it.

use std::collections::BTreeMap;

use pgrx::prelude::*;

use crate::chain::hash::{self, BlockFields, PrunePart, RootBuilder};
use crate::chain::seal::{append_block, chain_head, lock_chain, Kind};
use crate::errors::{AuditError, Result};

/// A data block's id range and size, as retention needs them.
struct DataBlock {
    from_id: i64,
    through_id: i64,
    row_count: i64,
}

fn data_blocks() -> Result<BTreeMap<i64, DataBlock>> {
    Spi::connect(|c| -> Result<BTreeMap<i64, DataBlock>> {
        let mut m = BTreeMap::new();
        for r in c.select(
            "SELECT block_id, from_id, through_id, row_count FROM audit.blocks
              WHERE kind OPERATOR(pg_catalog.=) 'rows'",
            None,
            &[],
        )? {
            let id = r.get::<i64>(1)?.unwrap_or_default();
            m.insert(
                id,
                DataBlock {
                    from_id: r.get(2)?.unwrap_or_default(),
                    through_id: r.get(3)?.unwrap_or_default(),
                    row_count: r.get(4)?.unwrap_or_default(),
                },
            );
        }
        Ok(m)
    })
}

/// The data block whose range holds `id`: the first one (blocks of rows cover
/// increasing, contiguous ranges) whose through_id is at or above it.
fn block_of(
    blocks: &BTreeMap<i64, DataBlock>,
    by_through: &BTreeMap<i64, i64>,
    id: i64,
) -> Option<i64> {
    by_through.range(id..).next().map(|(_, b)| *b).filter(|b| blocks[b].from_id < id)
}

/// Records the removal of every row of `audit.<partition>` (which must all be
/// sealed) as one retention record. Call before the partition is dropped or
/// detached, in the same transaction. Returns how many rows it recorded.
pub fn record(partition: &str) -> Result<i64> {
    let rows: Vec<(i64, Vec<u8>)> = Spi::connect(|c| -> Result<Vec<(i64, Vec<u8>)>> {
        let mut v = Vec::new();
        for r in
            c.select(&format!("SELECT id, row_hash FROM audit.{partition} ORDER BY id"), None, &[])?
        {
            v.push((
                r.get::<i64>(1)?.unwrap_or_default(),
                r.get::<Vec<u8>>(2)?.unwrap_or_default(),
            ));
        }
        Ok(v)
    })?;
    record_rows(&rows, &[], true)
}

/// Appends one retention record for `rows` (removed now, in id order; still in
/// audit.log when `still_in_log`) and for `emptied` (blocks already without
/// rows, from before retention records existed), and keeps the pairs verify
/// still needs.
fn record_rows(rows: &[(i64, Vec<u8>)], emptied: &[i64], still_in_log: bool) -> Result<i64> {
    if rows.is_empty() && emptied.is_empty() {
        return Ok(0);
    }
    lock_chain()?;
    let blocks = data_blocks()?;
    let by_through: BTreeMap<i64, i64> = blocks.iter().map(|(id, b)| (b.through_id, *id)).collect();
    let mut by_block: BTreeMap<i64, Vec<&(i64, Vec<u8>)>> = BTreeMap::new();
    for row in rows {
        let b = block_of(&blocks, &by_through, row.0).ok_or_else(|| {
            AuditError::Internal(format!(
                "retention would remove row {}, which is not sealed",
                row.0
            ))
        })?;
        by_block.entry(b).or_default().push(row);
    }
    let (head_id, head_through, prev) = chain_head()?;
    let prune_block = head_id + 1;
    let mut parts = Vec::new();
    for (&block_id, removed) in &by_block {
        let b = &blocks[&block_id];
        let kept_before = Spi::get_one_with_args::<i64>(
            "SELECT pg_catalog.count(*) FROM audit.pruned
              WHERE id OPERATOR(pg_catalog.>) $1 AND id OPERATOR(pg_catalog.<=) $2",
            &[b.from_id.into(), b.through_id.into()],
        )?
        .unwrap_or(0);
        let live_after = Spi::get_one_with_args::<i64>(
            &format!(
                "SELECT pg_catalog.count(*) FROM {}
                  WHERE id OPERATOR(pg_catalog.>) $1 AND id OPERATOR(pg_catalog.<=) $2",
                crate::log::chained_rows(crate::version::schema_is_current()?)
            ),
            &[b.from_id.into(), b.through_id.into()],
        )?
        .unwrap_or(0)
            - if still_in_log { removed.len() as i64 } else { 0 };
        let completes = live_after == 0 && kept_before + removed.len() as i64 == b.row_count;
        let mut h = RootBuilder::pruned_rows();
        for (id, rh) in removed {
            h.push(*id, rh);
        }
        parts.push(PrunePart {
            block_id,
            removed: removed.len() as i64,
            rows_hash: h.finish().to_vec(),
            completes,
        });
    }
    for &block_id in emptied {
        if !by_block.contains_key(&block_id) {
            parts.push(PrunePart {
                block_id,
                removed: 0,
                rows_hash: RootBuilder::pruned_rows().finish().to_vec(),
                completes: true,
            });
        }
    }
    parts.sort_by_key(|p| p.block_id);
    let root = hash::prune_root(&parts);
    let count: i64 = parts.iter().map(|p| p.removed).sum();
    let (first, last) = (rows.first().map(|r| r.0), rows.last().map(|r| r.0));
    append_block(
        Kind::Prune,
        BlockFields {
            block_id: prune_block,
            from_id: head_through,
            through_id: head_through,
            first_id: first,
            last_id: last,
            row_count: count,
            root: &root,
            prev_hash: &prev,
            sealed_at_us: 0,
        },
    )?;
    for p in &parts {
        Spi::run_with_args(
            "INSERT INTO audit.prune_parts (prune_block, block_id, removed, rows_hash, completes)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                prune_block.into(),
                p.block_id.into(),
                p.removed.into(),
                p.rows_hash.clone().into(),
                p.completes.into(),
            ],
        )?;
        let b = &blocks[&p.block_id];
        if p.completes {
            // The block is gone: verify checks its hash and links, and needs no pairs.
            Spi::run_with_args(
                "DELETE FROM audit.pruned WHERE id OPERATOR(pg_catalog.>) $1 AND id OPERATOR(pg_catalog.<=) $2",
                &[b.from_id.into(), b.through_id.into()],
            )?;
        } else if let Some(removed) = by_block.get(&p.block_id) {
            let ids: Vec<i64> = removed.iter().map(|r| r.0).collect();
            let hashes: Vec<Vec<u8>> = removed.iter().map(|r| r.1.clone()).collect();
            Spi::run_with_args(
                "INSERT INTO audit.pruned (id, row_hash, prune_block)
                 SELECT u.i, u.h, $3
                   FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]), pg_catalog.unnest($2::pg_catalog.bytea[])) AS u(i, h)",
                &[ids.into(), hashes.into(), prune_block.into()],
            )?;
        }
    }
    Ok(count)
}

/// Called once by the 0.1.0 -> 0.2.0 upgrade: what 0.1.0's retention recorded
/// (pairs with no retention record, and the list of emptied blocks) is committed
/// as one retention record, made at upgrade time.
#[pg_extern(volatile, parallel_unsafe, name = "_adopt_pruned")]
fn adopt_pruned() -> i64 {
    use crate::errors::OrRaise;
    crate::privilege::as_extension_owner(|| {
        let have_legacy = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n
                              ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                             WHERE n.nspname OPERATOR(pg_catalog.=) 'audit'
                               AND c.relname OPERATOR(pg_catalog.=) 'pruned_blocks')",
        )?
        .unwrap_or(false);
        let emptied: Vec<i64> = if have_legacy {
            Spi::connect(|c| -> Result<Vec<i64>> {
                let mut v = Vec::new();
                for r in
                    c.select("SELECT block_id FROM audit.pruned_blocks ORDER BY 1", None, &[])?
                {
                    v.push(r.get::<i64>(1)?.unwrap_or_default());
                }
                Ok(v)
            })?
        } else {
            Vec::new()
        };
        let rows: Vec<(i64, Vec<u8>)> = Spi::connect(|c| -> Result<Vec<(i64, Vec<u8>)>> {
            let mut v = Vec::new();
            for r in c.select(
                "SELECT id, row_hash FROM audit.pruned WHERE prune_block IS NULL ORDER BY id",
                None,
                &[],
            )? {
                v.push((
                    r.get::<i64>(1)?.unwrap_or_default(),
                    r.get::<Vec<u8>>(2)?.unwrap_or_default(),
                ));
            }
            Ok(v)
        })?;
        // The pairs move under the new record: delete them first, record_rows puts them back.
        Spi::run("DELETE FROM audit.pruned WHERE prune_block IS NULL")?;
        record_rows(&rows, &emptied, false)
    })
    .or_raise()
}

// ---- Checking retention records (audit.verify) ----------------------------------------------

/// A block as verify loaded it: what the retention check needs.
pub struct ChainBlock {
    pub block_id: i64,
    pub is_prune: bool,
    pub from_id: i64,
    pub through_id: i64,
    pub row_count: i64,
    pub root: Vec<u8>,
    pub first_id: Option<i64>,
}

/// What verify may use once the retention records check out.
#[derive(Default)]
pub struct Removed {
    /// (id, row_hash) of rows removed from blocks that still hold rows.
    pub pairs: BTreeMap<i64, Vec<u8>>,
    /// Data blocks retention emptied, with the retention record that did.
    pub emptied: std::collections::HashMap<i64, i64>,
}

/// A failed check: the first bad id if one is known, and what is wrong.
pub type Bad = (Option<i64>, String);

/// Checks audit.prune_parts and audit.pruned against the retention records in
/// `chain` (already checked for links and hashes), and, for a digest of block
/// `digest_block`, that no row it covers was removed by a record made after it.
pub fn check(
    chain: &[ChainBlock],
    digest_block: Option<i64>,
) -> Result<std::result::Result<Removed, Bad>> {
    let parts: Vec<(i64, PrunePart)> = Spi::connect(|c| -> Result<Vec<(i64, PrunePart)>> {
        let mut v = Vec::new();
        for r in c.select(
            "SELECT prune_block, block_id, removed, rows_hash, completes FROM audit.prune_parts ORDER BY 1, 2",
            None,
            &[],
        )? {
            v.push((
                r.get::<i64>(1)?.unwrap_or_default(),
                PrunePart {
                    block_id: r.get(2)?.unwrap_or_default(),
                    removed: r.get(3)?.unwrap_or_default(),
                    rows_hash: r.get(4)?.unwrap_or_default(),
                    completes: r.get(5)?.unwrap_or_default(),
                },
            ));
        }
        Ok(v)
    })?;
    let by_id = |id: i64| chain.get((id - 1).max(0) as usize).filter(|b| b.block_id == id);
    // 1. Each retention record's root is its parts; each part names an earlier data block.
    let mut grouped: BTreeMap<i64, Vec<PrunePart>> = BTreeMap::new();
    for (p, part) in &parts {
        match (by_id(*p), by_id(part.block_id)) {
            (Some(pb), Some(db)) if pb.is_prune && !db.is_prune && db.block_id < pb.block_id => {}
            _ => {
                return Ok(Err((None, format!(
                    "audit.prune_parts names block {} under retention record {}, and the chain has no such pair",
                    part.block_id, p
                ))))
            }
        }
        grouped.entry(*p).or_default().push(part.clone());
    }
    for b in chain.iter().filter(|b| b.is_prune) {
        let ps = grouped.get(&b.block_id).map(Vec::as_slice).unwrap_or(&[]);
        let count: i64 = ps.iter().map(|p| p.removed).sum();
        if hash::prune_root(ps).as_slice() != b.root.as_slice() || count != b.row_count {
            return Ok(Err((
                b.first_id,
                format!(
                    "retention record {} was altered: audit.prune_parts does not match its root",
                    b.block_id
                ),
            )));
        }
    }
    // 2. Given a digest: every removal of rows it covers was recorded before it.
    if let Some(d) = digest_block {
        if let Some((p, part)) = parts.iter().find(|(p, part)| *p > d && part.block_id <= d) {
            return Ok(Err((by_id(part.block_id).and_then(|b| b.first_id), format!(
                "rows of block {}, which the digest covers, were removed by retention recorded after the digest \
                 (retention record {}): the digest cannot vouch for them; verify against a digest taken after it",
                part.block_id, p
            ))));
        }
    }
    let mut removed = Removed::default();
    for (p, part) in &parts {
        if part.completes {
            removed.emptied.insert(part.block_id, *p);
        }
    }
    // 3. The kept pairs are exactly what their records say.
    let rows: Vec<(i64, Vec<u8>, i64)> = Spi::connect(|c| -> Result<Vec<(i64, Vec<u8>, i64)>> {
        let mut v = Vec::new();
        for r in
            c.select("SELECT id, row_hash, prune_block FROM audit.pruned ORDER BY id", None, &[])?
        {
            v.push((
                r.get(1)?.unwrap_or_default(),
                r.get(2)?.unwrap_or_default(),
                r.get(3)?.unwrap_or_default(),
            ));
        }
        Ok(v)
    })?;
    let data: Vec<&ChainBlock> = chain.iter().filter(|b| !b.is_prune).collect();
    let mut sums: BTreeMap<(i64, i64), (RootBuilder, i64)> = BTreeMap::new();
    for (id, h, p) in rows {
        let i = data.partition_point(|b| b.through_id < id);
        let Some(db) = data.get(i).filter(|b| b.from_id < id) else {
            return Ok(Err((Some(id), format!("row {id} is recorded as removed by retention, but no sealed block holds its id"))));
        };
        if removed.emptied.contains_key(&db.block_id) {
            continue; // left over from before the block was emptied: not needed
        }
        let e = sums.entry((p, db.block_id)).or_insert_with(|| (RootBuilder::pruned_rows(), 0));
        e.0.push(id, &h);
        e.1 += 1;
        removed.pairs.insert(id, h);
    }
    for (p, part) in &parts {
        if part.completes || removed.emptied.contains_key(&part.block_id) {
            continue;
        }
        let got = sums.remove(&(*p, part.block_id));
        let ok = match got {
            Some((root, n)) => {
                n == part.removed && root.finish().as_slice() == part.rows_hash.as_slice()
            }
            None => part.removed == 0,
        };
        if !ok {
            return Ok(Err((
                by_id(part.block_id).and_then(|b| b.first_id),
                format!(
                    "audit.pruned does not hold what retention record {} removed from block {}",
                    p, part.block_id
                ),
            )));
        }
    }
    if let Some(((p, b), _)) = sums.into_iter().next() {
        return Ok(Err((by_id(b).and_then(|x| x.first_id), format!(
            "audit.pruned holds rows of block {b} under retention record {p}, which removed none from it"
        ))));
    }
    Ok(Ok(removed))
}

/// 0.1.0's retention bookkeeping, read as 0.1.0's verify read it (no retention
/// records yet): used only between a package upgrade and ALTER EXTENSION UPDATE,
/// whose upgrade script commits this bookkeeping into a retention record.
pub fn legacy() -> Result<std::result::Result<Removed, Bad>> {
    let mut removed = Removed::default();
    Spi::connect(|c| -> Result<()> {
        for r in c.select("SELECT id, row_hash FROM audit.pruned", None, &[])? {
            removed.pairs.insert(
                r.get::<i64>(1)?.unwrap_or_default(),
                r.get::<Vec<u8>>(2)?.unwrap_or_default(),
            );
        }
        for r in c.select("SELECT block_id FROM audit.pruned_blocks", None, &[])? {
            removed.emptied.insert(r.get::<i64>(1)?.unwrap_or_default(), 0);
        }
        Ok(())
    })?;
    Ok(Ok(removed))
}
