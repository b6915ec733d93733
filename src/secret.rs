//! The per-database redaction key (audit.secret), which turns a redacted
//! column's value into its HMAC marker.
//!
//! When can it change under a running backend? audit.secret is write-once: the
//! first audit.track() inserts it, and guard triggers refuse UPDATE, DELETE and
//! TRUNCATE (sql/finalize.sql), since markers already in the log are only
//! comparable with markers made by the same key. It changes only with a new
//! incarnation of the extension (DROP EXTENSION and CREATE EXTENSION, in this
//! session or another, or a restore into a re-created extension). That sends
//! relcache invalidations for the extension's tables, which bump
//! ext::generation(); a key read under an older generation is read again.
//! tests/trust.rs (redaction_key_follows_recreation) proves it.

use std::cell::RefCell;
use std::rc::Rc;

use crate::errors::{AuditError, Result};
use crate::ext::{self, ExtState};
use crate::privilege::AsOwner;

thread_local! {
    /// The key and the ext::generation() it was read under.
    static KEY: RefCell<Option<(u64, Rc<[u8]>)>> = const { RefCell::new(None) };
}

/// The key, read once per generation as the extension owner (who alone may read it).
pub fn key(ext: &ExtState) -> Result<Rc<[u8]>> {
    let generation = ext::generation();
    if let Some((g, k)) = KEY.with(|k| k.borrow().clone()) {
        if g == generation {
            return Ok(k);
        }
    }
    let key = {
        let _owner = AsOwner::enter(ext.owner);
        crate::query::one::<Vec<u8>>("SELECT (SELECT key FROM audit.secret LIMIT 1)")?
    }
    .ok_or_else(|| AuditError::Internal("audit.secret is empty; run audit.track() again".into()))?;
    let key: Rc<[u8]> = key.into();
    KEY.with(|k| *k.borrow_mut() = Some((generation, key.clone())));
    Ok(key)
}
