//! Sealing: committed rows go into a chain of blocks, by one sealer at a time,
//! without ever making writers wait.
//!
//! The rule that makes late commits safe: every row's id is handed out after its
//! transaction got its xid. So once we read the sequence's last value S and then
//! the next xid X, every transaction that could still hold an id <= S has an
//! xid < X. When the oldest running xid is >= X, ids <= S are final: each one is
//! committed and visible, or will never exist. Blocks cover contiguous id ranges
//! (from_id, through_id], so no row can ever land in a sealed range.

use pgrx::prelude::*;

use crate::chain::hash::{self, BlockFields, RootBuilder};
use crate::errors::{AuditError, OrRaise, Result};
use crate::privilege::as_extension_owner;

/// Most rows in one block: bounds the sealer's memory and each block's verify cost.
pub const BLOCK_MAX_ROWS: i64 = 100_000;
/// Advisory lock key ("audit_se") that makes one sealer at a time.
pub const SEAL_LOCK_KEY: i64 = 0x6175_6469_745f_7365;
pub const ZERO_HASH: [u8; 32] = [0u8; 32];

pub fn us_sql(col: &str) -> String {
    format!("(pg_catalog.extract(epoch FROM {col}) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8")
}

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

/// The id up to which rows are final now, updating the pending candidate.
fn ready_horizon() -> Result<Option<i64>> {
    let (last, called) = Spi::get_two::<i64, bool>("SELECT last_value, is_called FROM audit.log_id_seq")?;
    let s = if called.unwrap_or(false) { last.unwrap_or(0) } else { 0 };
    // SAFETY: reads the shared next-xid counter; must come after reading the sequence.
    let x = unsafe { pg_sys::ReadNextFullTransactionId() }.value as i64;
    // A fresh snapshot tells which xids may still run: those in xip, and every xid at
    // or above xmax. Our own xid does not count: our own rows are visible to us and
    // commit or abort together with the block that seals them.
    let (xmax, own, xip) = Spi::connect(|c| -> Result<(i64, Option<i64>, Vec<i64>)> {
        let mut rows = c.select(
            "SELECT pg_catalog.pg_snapshot_xmax(s)::pg_catalog.text::pg_catalog.int8,
                    pg_catalog.pg_current_xact_id_if_assigned()::pg_catalog.text::pg_catalog.int8,
                    ARRAY(SELECT x::pg_catalog.text::pg_catalog.int8 FROM pg_catalog.pg_snapshot_xip(s) AS x)
               FROM pg_catalog.pg_current_snapshot() AS s",
            None,
            &[],
        )?;
        let r = rows.next().ok_or_else(|| AuditError::Internal("no snapshot".into()))?;
        Ok((r.get(1)?.unwrap_or(0), r.get(2)?, r.get::<Vec<i64>>(3)?.unwrap_or_default()))
    })?;
    // Has every transaction with an xid below `bound` (other than ours) finished?
    let finished_below = |bound: i64| {
        let none_in_xip = xip.iter().all(|&x| Some(x) == own || x >= bound);
        none_in_xip && (bound <= xmax || (own == Some(xmax) && bound <= xmax + 1))
    };
    let (p_id, p_xid) = Spi::get_two::<i64, i64>(
        "SELECT (SELECT pending_id FROM audit.seal_state), (SELECT pending_xid FROM audit.seal_state)",
    )?;
    let (horizon, pending) = if finished_below(x) {
        (Some(s), None)
    } else {
        match (p_id, p_xid) {
            (Some(pid), Some(pxid)) if finished_below(pxid) => (Some(pid), Some((s, x))),
            (Some(pid), Some(pxid)) => (None, Some((pid, pxid))),
            _ => (None, Some((s, x))),
        }
    };
    let (pid, pxid) = match pending {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    Spi::run_with_args(
        "INSERT INTO audit.seal_state (id, pending_id, pending_xid) VALUES (1, $1, $2)
         ON CONFLICT (id) DO UPDATE SET pending_id = EXCLUDED.pending_id, pending_xid = EXCLUDED.pending_xid",
        &[pid.into(), pxid.into()],
    )?;
    Ok(horizon)
}

pub fn seal_impl() -> Result<i64> {
    crate::query::refuse_during_recovery(c"audit.seal()");
    as_extension_owner(|| {
        let got = Spi::get_one_with_args::<bool>("SELECT pg_catalog.pg_try_advisory_xact_lock($1)", &[SEAL_LOCK_KEY.into()])?
            .unwrap_or(false);
        if !got {
            return Ok(0); // another sealer is at work
        }
        let Some(horizon) = ready_horizon()? else { return Ok(0) };
        let (mut block_id, mut from, mut prev) = chain_head()?;
        let mut total = 0i64;
        while from < horizon {
            let mut root = RootBuilder::new();
            let (mut first, mut last) = (None, None);
            Spi::connect(|c| -> Result<()> {
                let rows = c.select(
                    "SELECT id, row_hash FROM audit.log
                      WHERE id OPERATOR(pg_catalog.>) $1 AND id OPERATOR(pg_catalog.<=) $2
                      ORDER BY id LIMIT $3",
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
            let sealed_at = Spi::get_one::<pgrx::datum::TimestampWithTimeZone>("SELECT pg_catalog.clock_timestamp()")?
                .ok_or_else(|| AuditError::Internal("clock_timestamp() returned NULL".into()))?;
            let sealed_us = pg_sys::TimestampTz::from(sealed_at) + crate::capture::PG_EPOCH_OFFSET_US;
            block_id += 1;
            let bh = hash::block_hash(&BlockFields {
                block_id,
                from_id: from,
                through_id: through,
                first_id: first,
                last_id: last,
                row_count: count,
                root: &root,
                prev_hash: &prev,
                sealed_at_us: sealed_us,
            });
            Spi::run_with_args(
                "INSERT INTO audit.blocks (block_id, from_id, through_id, first_id, last_id, row_count, root,
                                           prev_hash, block_hash, sealed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                &[
                    block_id.into(),
                    from.into(),
                    through.into(),
                    first.into(),
                    last.into(),
                    count.into(),
                    root.to_vec().into(),
                    prev.clone().into(),
                    bh.to_vec().into(),
                    sealed_at.into(),
                ],
            )?;
            total += count;
            from = through;
            prev = bh.to_vec();
        }
        Ok(total)
    })
}

#[pg_extern(volatile, parallel_unsafe)]
fn seal() -> i64 {
    seal_impl().or_raise()
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
