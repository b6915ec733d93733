//! Sealing: committed rows go into a chain of blocks, by one sealer at a time,
//! without ever making writers wait.
//!
//! The rule that makes late commits safe: a transaction marks itself as a
//! holder of audit ids before it draws its first one (chain::writers). So once
//! we have read the sequence's last value S and then listed the holders, every
//! id <= S is final (committed and visible, or never to exist) as soon as each
//! listed holder has ended. Our own transaction is never listed: our own rows
//! are visible to us and commit or abort together with the block that seals
//! them. Blocks cover contiguous id ranges (from_id, through_id], so no row can
//! ever land in a sealed range.
//!
//! `audit.seal()` waits: for a concurrent sealer, then for the listed holders
//! (bounded by lock_timeout and statement_timeout), so that when it returns,
//! every row committed before it was called is sealed. The worker never waits:
//! it seals what is final now and keeps a candidate (S and its holders) in
//! audit.seal_state for its next round.

use pgrx::prelude::*;

use crate::chain::hash::{self, BlockFields, RootBuilder};
use crate::chain::writers;
use crate::errors::{AuditError, OrRaise, Result};
use crate::privilege::as_extension_owner;

/// Most rows in one block: bounds the sealer's memory and each block's verify cost.
pub const BLOCK_MAX_ROWS: i64 = 100_000;
/// Advisory lock key ("audit_se") that makes one sealer at a time.
pub const SEAL_LOCK_KEY: i64 = 0x6175_6469_745f_7365;
pub const ZERO_HASH: [u8; 32] = [0u8; 32];

/// Last sealed block: (block_id, through_id, block_hash).
pub fn chain_head() -> Result<(i64, i64, Vec<u8>)> {
    let head = Spi::get_three::<i64, i64, Vec<u8>>(
        "SELECT (SELECT block_id FROM audit.blocks ORDER BY block_id DESC LIMIT 1),
                (SELECT through_id FROM audit.blocks ORDER BY block_id DESC LIMIT 1),
                (SELECT block_hash FROM audit.blocks ORDER BY block_id DESC LIMIT 1)",
    )?;
    Ok(match head {
        (Some(b), Some(t), Some(h)) => (b, t, h),
        _ => (0, 0, ZERO_HASH.to_vec()),
    })
}

/// The sequence's last value: every id handed out so far is <= it.
fn last_id_handed_out() -> Result<i64> {
    let (last, called) =
        Spi::get_two::<i64, bool>("SELECT last_value, is_called FROM audit.log_id_seq")?;
    Ok(if called.unwrap_or(false) { last.unwrap_or(0) } else { 0 })
}

/// Waits until every id handed out so far is final, and returns the highest.
fn wait_horizon(ext: pg_sys::Oid) -> Result<i64> {
    let s = last_id_handed_out()?;
    for w in writers::holders(ext) {
        // lock_timeout and statement_timeout end the wait with an ERROR, which becomes ours.
        let gave_up = |e: &crate::subxact::Caught| {
            matches!(
                e.code,
                PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE | PgSqlErrorCode::ERRCODE_QUERY_CANCELED
            )
        };
        crate::subxact::run(|| writers::wait_for(w), gave_up)
            .map_err(|_| AuditError::SealWaitTimedOut)?;
    }
    Ok(s)
}

/// The id up to which rows are final now, without waiting; updates the candidate
/// that the next call can seal once its holders have ended.
fn ready_horizon(ext: pg_sys::Oid) -> Result<Option<i64>> {
    let s = last_id_handed_out()?;
    let now_holding = writers::holders(ext);
    if !crate::version::schema_is_current()? {
        // 0.1.0's audit.seal_state has no room for the candidate: until ALTER
        // EXTENSION UPDATE, seal only when no writer holds an id.
        return Ok(now_holding.is_empty().then_some(s));
    }
    let (p_id, p_writers) = Spi::get_two::<i64, Vec<i64>>(
        "SELECT (SELECT pending_id FROM audit.seal_state), (SELECT pending_writers FROM audit.seal_state)",
    )?;
    let (horizon, pending) = if now_holding.is_empty() {
        (Some(s), None)
    } else {
        match (p_id, p_writers) {
            // A candidate can never be above what the sequence has handed out.
            (Some(pid), Some(pw))
                if pid <= s && pw.iter().all(|&w| writers::finished(writers::Writer(w))) =>
            {
                (Some(pid), Some(s))
            }
            (Some(pid), Some(_)) if pid <= s => (None, None),
            _ => (None, Some(s)),
        }
    };
    if let Some(candidate) = pending {
        let ws: Vec<i64> = now_holding.iter().map(|w| w.0).collect();
        Spi::run_with_args(
            "INSERT INTO audit.seal_state (id, pending_id, pending_writers) VALUES (1, $1, $2)
             ON CONFLICT (id) DO UPDATE SET pending_id = EXCLUDED.pending_id, pending_writers = EXCLUDED.pending_writers",
            &[candidate.into(), ws.into()],
        )?;
    } else if horizon.is_some() {
        Spi::run("DELETE FROM audit.seal_state")?;
    }
    Ok(horizon)
}

/// Whether `seal_impl` may wait (audit.seal()) or must not (the worker).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Yes,
    No,
}

pub fn seal_impl(wait: Wait) -> Result<i64> {
    crate::query::refuse_during_recovery(c"audit.seal()");
    // Rows of this transaction still kept for a multi-insert would be missing from
    // the range sealed now, and land in it later.
    crate::log::batch::flush_before_read();
    let ext = crate::ext::ext_state()?.ext;
    as_extension_owner(|| {
        if wait == Wait::Yes {
            lock_chain()?;
        } else {
            let got = Spi::get_one_with_args::<bool>(
                "SELECT pg_catalog.pg_try_advisory_xact_lock($1)",
                &[SEAL_LOCK_KEY.into()],
            )?
            .unwrap_or(false);
            if !got {
                return Ok(0); // another sealer is at work; it will seal what we would have
            }
        }
        let horizon = match wait {
            Wait::Yes => wait_horizon(ext)?,
            Wait::No => match ready_horizon(ext)? {
                Some(h) => h,
                None => return Ok(0),
            },
        };
        let current = crate::version::schema_is_current()?;
        let (mut block_id, mut from, mut prev) = chain_head()?;
        let mut total = 0i64;
        while from < horizon {
            let mut root = RootBuilder::new();
            let (mut first, mut last) = (None, None);
            Spi::connect(|c| -> Result<()> {
                let rows = c.select(
                    &format!(
                        "SELECT id, row_hash FROM {}
                          WHERE id OPERATOR(pg_catalog.>) $1 AND id OPERATOR(pg_catalog.<=) $2
                          ORDER BY id LIMIT $3",
                        crate::log::chained_rows(current)
                    ),
                    None,
                    &[from.into(), horizon.into(), BLOCK_MAX_ROWS.into()],
                )?;
                for r in rows {
                    let id = r.get::<i64>(1)?.unwrap_or_default();
                    let h = r.get::<Vec<u8>>(2)?.unwrap_or_default();
                    root.push(id, &h);
                    first.get_or_insert(id);
                    last = Some(id);
                }
                Ok(())
            })?;
            let count = root.count() as i64;
            if count == 0 {
                break; // nothing committed in the range yet: keep it open, nothing is lost
            }
            let through = if count == BLOCK_MAX_ROWS { last.unwrap_or(horizon) } else { horizon };
            let root = root.finish();
            block_id += 1;
            let bh = append_block(
                Kind::Rows,
                BlockFields {
                    block_id,
                    from_id: from,
                    through_id: through,
                    first_id: first,
                    last_id: last,
                    row_count: count,
                    root: &root,
                    prev_hash: &prev,
                    sealed_at_us: 0,
                },
            )?;
            total += count;
            from = through;
            prev = bh;
        }
        crate::status::record(
            crate::status::Run::Seal,
            Ok(format!("sealed {total} row(s) through id {from}")),
        )?;
        Ok(total)
    })
}

/// What a block of the chain is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Seals the ids in (from_id, through_id].
    Rows,
    /// A retention record (chain::prune): covers no ids.
    Prune,
}

/// Appends one block: stamps it with the clock, hashes it under its kind's
/// domain, inserts it into audit.blocks and returns its hash. The caller holds
/// the chain (`lock_chain`, or the sealer's lock) and gives the head's hash as
/// `prev_hash`; `fields.sealed_at_us` is set here.
pub fn append_block(kind: Kind, mut fields: BlockFields<'_>) -> Result<Vec<u8>> {
    let sealed_at =
        Spi::get_one::<pgrx::datum::TimestampWithTimeZone>("SELECT pg_catalog.clock_timestamp()")?
            .ok_or_else(|| AuditError::Internal("clock_timestamp() returned NULL".into()))?;
    fields.sealed_at_us = pg_sys::TimestampTz::from(sealed_at) + crate::log::PG_EPOCH_OFFSET_US;
    let (bh, kind) = match kind {
        Kind::Rows => (hash::block_hash(&fields), "rows"),
        Kind::Prune => (hash::prune_block_hash(&fields), "prune"),
    };
    // 0.1.0's audit.blocks has no kind column (before ALTER EXTENSION UPDATE): only
    // blocks of rows are made then, and the column's default is 'rows' anyway.
    let kind_col = if kind == "rows" { "" } else { ", kind" };
    let kind_val = if kind == "rows" { "" } else { ", 'prune'" };
    Spi::run_with_args(
        &format!(
            "INSERT INTO audit.blocks (block_id, from_id, through_id, first_id, last_id, row_count, root,
                                       prev_hash, block_hash, sealed_at{kind_col})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10{kind_val})"
        ),
        &[
            fields.block_id.into(),
            fields.from_id.into(),
            fields.through_id.into(),
            fields.first_id.into(),
            fields.last_id.into(),
            fields.row_count.into(),
            fields.root.to_vec().into(),
            fields.prev_hash.to_vec().into(),
            bh.to_vec().into(),
            sealed_at.into(),
        ],
    )?;
    Ok(bh.to_vec())
}

/// Takes the chain for appending (sealing, or retention recording what it
/// removes), waiting for another sealer; held until the transaction ends.
pub fn lock_chain() -> Result<()> {
    Spi::run_with_args("SELECT pg_catalog.pg_advisory_xact_lock($1)", &[SEAL_LOCK_KEY.into()])?;
    Ok(())
}

#[pg_extern(volatile, parallel_unsafe)]
fn seal() -> i64 {
    seal_impl(Wait::Yes).or_raise()
}

#[pg_extern(stable, parallel_safe)]
fn digest() -> pgrx::JsonB {
    let r = as_extension_owner(|| {
        Ok(crate::query::one::<pgrx::JsonB>(
            "SELECT (SELECT pg_catalog.jsonb_build_object('block_id', block_id, 'last_id', last_id,
                        'through_id', through_id, 'block_hash', pg_catalog.encode(block_hash, 'hex'),
                        'sealed_at', sealed_at)
                       FROM audit.blocks ORDER BY block_id DESC LIMIT 1)",
        )?)
    })
    .or_raise();
    r.ok_or(AuditError::NothingSealed).or_raise()
}
