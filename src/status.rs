//! audit.status(): one place for monitoring to look. The last maintenance and
//! sealing run in this database (by the worker or by a call), how each ended
//! and why, and how much is waiting to be sealed.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::errors::{OrRaise, Result};
use crate::privilege::as_extension_owner;

/// Which run to record.
#[derive(Clone, Copy)]
pub enum Run {
    Maintain,
    Seal,
}

/// Records how a run ended: `Ok(detail)` or `Err(message)`. Runs as the
/// extension owner, in the caller's transaction (the worker's own, after a
/// failed run was rolled back in its subtransaction).
pub fn record(run: Run, outcome: std::result::Result<String, String>) -> Result<()> {
    let (ok, detail) = match outcome {
        Ok(d) => (true, d),
        Err(e) => (false, e),
    };
    let sql = match run {
        Run::Maintain => {
            "INSERT INTO audit.status_state (id, maintain_at, maintain_ok, maintain_detail)
             VALUES (1, pg_catalog.clock_timestamp(), $1, $2)
             ON CONFLICT (id) DO UPDATE SET maintain_at = EXCLUDED.maintain_at,
                 maintain_ok = EXCLUDED.maintain_ok, maintain_detail = EXCLUDED.maintain_detail"
        }
        Run::Seal => {
            "INSERT INTO audit.status_state (id, seal_at, seal_ok, seal_detail)
             VALUES (1, pg_catalog.clock_timestamp(), $1, $2)
             ON CONFLICT (id) DO UPDATE SET seal_at = EXCLUDED.seal_at,
                 seal_ok = EXCLUDED.seal_ok, seal_detail = EXCLUDED.seal_detail"
        }
    };
    as_extension_owner(|| {
        if crate::version::schema_is_current()? {
            Spi::run_with_args(sql, &[ok.into(), detail.into()])?;
        }
        Ok(())
    })
}

/// The last maintenance and sealing runs and what is waiting to be sealed.
#[allow(clippy::type_complexity)] // the result's columns, as pgrx spells them
#[pg_extern(stable, parallel_safe)]
fn status() -> TableIterator<
    'static,
    (
        name!(last_maintain_at, Option<TimestampWithTimeZone>),
        name!(maintain_ok, Option<bool>),
        name!(maintain_detail, Option<String>),
        name!(last_seal_at, Option<TimestampWithTimeZone>),
        name!(seal_ok, Option<bool>),
        name!(seal_detail, Option<String>),
        name!(unsealed_rows, Option<i64>),
        name!(oldest_unsealed_age, Option<pgrx::datum::Interval>),
    ),
> {
    let row = as_extension_owner(|| {
        Spi::connect(|c| {
            let mut rows = c.select(
                "WITH s AS (SELECT * FROM audit.status_state WHERE id OPERATOR(pg_catalog.=) 1),
                      h AS (SELECT COALESCE(pg_catalog.max(through_id), 0) AS through FROM audit.blocks),
                      u AS (SELECT pg_catalog.count(*) AS n, pg_catalog.min(l.at) AS oldest
                              FROM (SELECT id, changed_at AS at FROM audit.log
                                    UNION ALL SELECT id, accessed_at FROM audit.access_log) AS l, h
                             WHERE l.id OPERATOR(pg_catalog.>) h.through)
                 SELECT s.maintain_at, s.maintain_ok, s.maintain_detail, s.seal_at, s.seal_ok, s.seal_detail,
                        u.n, pg_catalog.now() OPERATOR(pg_catalog.-) u.oldest
                   FROM u LEFT JOIN s ON true",
                None,
                &[],
            )?;
            let r = rows.next().ok_or_else(|| crate::errors::AuditError::Internal("audit.status() found no row".into()))?;
            Ok((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?))
        })
    })
    .or_raise();
    TableIterator::once(row)
}
