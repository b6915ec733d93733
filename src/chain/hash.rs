//! Canonical, length-prefixed, domain-separated encodings and their SHA-256 hashes.
//! The encoding is the contract an outside auditor re-implements (docs/hashing.md);
//! changing it means a new version tag, never an edit.

use sha2::{Digest, Sha256};

pub const ROW_DOMAIN: &[u8] = b"audit_ext:row:v1";
/// A row of audit.access_log: its own domain, so it can never pass for a change.
pub const ACCESS_DOMAIN: &[u8] = b"audit_ext:access:v1";
pub const ROOT_DOMAIN: &[u8] = b"audit_ext:root:v1";
pub const BLOCK_DOMAIN: &[u8] = b"audit_ext:block:v1";
/// A retention record: a block that covers no new ids but commits what retention removed.
pub const PRUNE_DOMAIN: &[u8] = b"audit_ext:prune:v1";
pub const PRUNE_ROOT_DOMAIN: &[u8] = b"audit_ext:prune-root:v1";
pub const PRUNED_ROWS_DOMAIN: &[u8] = b"audit_ext:pruned-rows:v1";
pub const HMAC_MARKER_PREFIX: &str = "redacted:";

const TAG_NULL: u8 = 0;
const TAG_INT: u8 = 1;
const TAG_TEXT: u8 = 2;
const TAG_JSONB: u8 = 3;
const TAG_TEXT_ARRAY: u8 = 4;
const TAG_BYTES: u8 = 5;

/// One `audit.log` row as the hash sees it. Timestamps are microseconds since the
/// Unix epoch; text is its bytes in the database encoding; jsonb values are their
/// canonical text (`jsonb_out`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowFields<'a> {
    pub id: i64,
    pub changed_at_us: i64,
    pub txid: i64,
    pub schema_name: &'a [u8],
    pub table_name: &'a [u8],
    pub operation: &'a [u8],
    pub row_id: Option<&'a [u8]>,
    pub old_values: Option<&'a [u8]>,
    pub new_values: Option<&'a [u8]>,
    pub changed_fields: Option<Vec<Option<&'a [u8]>>>,
    pub changed_by: &'a [u8],
    pub db_user: &'a [u8],
    pub session_info: Option<&'a [u8]>,
    pub old_row_id: Option<&'a [u8]>,
}

/// One `audit.access_log` row as the hash sees it, with the conventions of [`RowFields`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccessFields<'a> {
    pub id: i64,
    pub accessed_at_us: i64,
    pub schema_name: &'a [u8],
    pub table_name: &'a [u8],
    pub command: &'a [u8],
    pub columns: Option<Vec<Option<&'a [u8]>>>,
    pub rows: Option<i64>,
    pub outcome: &'a [u8],
    pub sqlstate: Option<&'a [u8]>,
    pub accessed_by: &'a [u8],
    pub db_user: &'a [u8],
    pub role: &'a [u8],
    pub txid: Option<i64>,
    pub session_info: Option<&'a [u8]>,
    pub query_id: Option<i64>,
    pub statement: Option<&'a [u8]>,
    pub parameters: Option<&'a [u8]>,
    pub backend_pid: i64,
}

struct Enc(Sha256);

impl Enc {
    fn new(domain: &[u8]) -> Self {
        let mut e = Enc(Sha256::new());
        e.raw(domain);
        e
    }
    fn raw(&mut self, b: &[u8]) {
        self.0.update((b.len() as u32).to_be_bytes());
        self.0.update(b);
    }
    fn int(&mut self, v: i64) {
        self.0.update([TAG_INT]);
        self.0.update(v.to_be_bytes());
    }
    fn tagged(&mut self, tag: u8, v: Option<&[u8]>) {
        match v {
            None => self.0.update([TAG_NULL]),
            Some(b) => {
                self.0.update([tag]);
                self.raw(b);
            }
        }
    }
    fn opt_int(&mut self, v: Option<i64>) {
        match v {
            Some(v) => self.int(v),
            None => self.0.update([TAG_NULL]),
        }
    }
    fn text_array(&mut self, v: &Option<Vec<Option<&[u8]>>>) {
        match v {
            None => self.0.update([TAG_NULL]),
            Some(items) => {
                self.0.update([TAG_TEXT_ARRAY]);
                self.0.update((items.len() as u32).to_be_bytes());
                for item in items {
                    self.text(*item);
                }
            }
        }
    }
    fn text(&mut self, v: Option<&[u8]>) {
        self.tagged(TAG_TEXT, v)
    }
    fn bytes(&mut self, v: Option<&[u8]>) {
        self.tagged(TAG_BYTES, v)
    }
    fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

pub fn row_hash(r: &RowFields<'_>) -> [u8; 32] {
    let mut e = Enc::new(ROW_DOMAIN);
    e.int(r.id);
    e.int(r.changed_at_us);
    e.int(r.txid);
    e.text(Some(r.schema_name));
    e.text(Some(r.table_name));
    e.text(Some(r.operation));
    e.text(r.row_id);
    e.tagged(TAG_JSONB, r.old_values);
    e.tagged(TAG_JSONB, r.new_values);
    e.text_array(&r.changed_fields);
    e.text(Some(r.changed_by));
    e.text(Some(r.db_user));
    e.tagged(TAG_JSONB, r.session_info);
    e.text(r.old_row_id);
    e.finish()
}

pub fn access_hash(r: &AccessFields<'_>) -> [u8; 32] {
    let mut e = Enc::new(ACCESS_DOMAIN);
    e.int(r.id);
    e.int(r.accessed_at_us);
    e.text(Some(r.schema_name));
    e.text(Some(r.table_name));
    e.text(Some(r.command));
    e.text_array(&r.columns);
    e.opt_int(r.rows);
    e.text(Some(r.outcome));
    e.text(r.sqlstate);
    e.text(Some(r.accessed_by));
    e.text(Some(r.db_user));
    e.text(Some(r.role));
    e.opt_int(r.txid);
    e.tagged(TAG_JSONB, r.session_info);
    e.opt_int(r.query_id);
    e.text(r.statement);
    e.tagged(TAG_JSONB, r.parameters);
    e.int(r.backend_pid);
    e.finish()
}

/// Incremental block root: H(ROOT_DOMAIN, then (id, row_hash) of every row in id order, then the count).
pub struct RootBuilder {
    enc: Enc,
    count: u64,
}

impl RootBuilder {
    pub fn new() -> Self {
        RootBuilder { enc: Enc::new(ROOT_DOMAIN), count: 0 }
    }
    /// The same construction over the (id, row_hash) pairs one retention run removed from one block.
    pub fn pruned_rows() -> Self {
        RootBuilder { enc: Enc::new(PRUNED_ROWS_DOMAIN), count: 0 }
    }
    pub fn push(&mut self, id: i64, row_hash: &[u8]) {
        self.enc.int(id);
        self.enc.bytes(Some(row_hash));
        self.count += 1;
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn finish(mut self) -> [u8; 32] {
        self.enc.0.update(self.count.to_be_bytes());
        self.enc.finish()
    }
}

impl Default for RootBuilder {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockFields<'a> {
    pub block_id: i64,
    pub from_id: i64,
    pub through_id: i64,
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
    pub row_count: i64,
    pub root: &'a [u8],
    pub prev_hash: &'a [u8],
    pub sealed_at_us: i64,
}

pub fn block_hash(b: &BlockFields<'_>) -> [u8; 32] {
    block_hash_in(BLOCK_DOMAIN, b)
}

/// A retention record's hash: the block fields under their own domain, so no
/// block of rows can pass for one or the other way round.
pub fn prune_block_hash(b: &BlockFields<'_>) -> [u8; 32] {
    block_hash_in(PRUNE_DOMAIN, b)
}

/// One data block's share of a retention run.
#[derive(Debug, Clone, PartialEq)]
pub struct PrunePart {
    pub block_id: i64,
    pub removed: i64,
    pub rows_hash: Vec<u8>,
    pub completes: bool,
}

/// A retention record's root: its parts in block_id order, then their count.
pub fn prune_root(parts: &[PrunePart]) -> [u8; 32] {
    let mut e = Enc::new(PRUNE_ROOT_DOMAIN);
    for p in parts {
        e.int(p.block_id);
        e.int(p.removed);
        e.bytes(Some(&p.rows_hash));
        e.int(p.completes as i64);
    }
    e.0.update((parts.len() as u64).to_be_bytes());
    e.finish()
}

fn block_hash_in(domain: &[u8], b: &BlockFields<'_>) -> [u8; 32] {
    let mut e = Enc::new(domain);
    e.int(b.block_id);
    e.int(b.from_id);
    e.int(b.through_id);
    e.opt_int(b.first_id);
    e.opt_int(b.last_id);
    e.int(b.row_count);
    e.bytes(Some(b.root));
    e.bytes(Some(b.prev_hash));
    e.int(b.sealed_at_us);
    e.finish()
}

/// HMAC-SHA-256 (RFC 2104), used for redaction markers.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

pub fn redaction_marker(key: &[u8], value_text: &[u8]) -> String {
    format!("{HMAC_MARKER_PREFIX}{}", hex::encode(hmac_sha256(key, value_text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RowFields<'static> {
        RowFields {
            id: 7,
            changed_at_us: 1_700_000_000_000_000,
            txid: 1234,
            schema_name: b"public",
            table_name: b"users",
            operation: b"UPDATE",
            row_id: Some(&b"42"[..]),
            old_values: Some(&br#"{"email": "a@x"}"#[..]),
            new_values: Some(&br#"{"email": "b@x", "id": 42}"#[..]),
            changed_fields: Some(vec![Some(&b"email"[..])]),
            changed_by: b"alice",
            db_user: b"app",
            session_info: Some(&br#"{"backend_pid": 1}"#[..]),
            old_row_id: None,
        }
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hmac_long_key_rfc4231_case_6() {
        let key = [0xaau8; 131];
        let mac = hmac_sha256(&key, b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = row_hash(&sample());
        let mut variants: Vec<RowFields> = Vec::new();
        let s = sample();
        variants.push(RowFields { id: 8, ..s.clone() });
        variants.push(RowFields { changed_at_us: s.changed_at_us + 1, ..s.clone() });
        variants.push(RowFields { txid: 1235, ..s.clone() });
        variants.push(RowFields { schema_name: b"publi", ..s.clone() });
        variants.push(RowFields { table_name: b"user", ..s.clone() });
        variants.push(RowFields { operation: b"DELETE", ..s.clone() });
        variants.push(RowFields { row_id: None, ..s.clone() });
        variants.push(RowFields { row_id: Some(&b"43"[..]), ..s.clone() });
        variants.push(RowFields { old_values: None, ..s.clone() });
        variants.push(RowFields { new_values: Some(&b"{}"[..]), ..s.clone() });
        variants.push(RowFields { changed_fields: None, ..s.clone() });
        variants.push(RowFields { changed_fields: Some(vec![]), ..s.clone() });
        variants.push(RowFields { changed_fields: Some(vec![None]), ..s.clone() });
        variants.push(RowFields { changed_by: b"bob", ..s.clone() });
        variants.push(RowFields { db_user: b"root", ..s.clone() });
        variants.push(RowFields { session_info: None, ..s.clone() });
        variants.push(RowFields { old_row_id: Some(&b"41"[..]), ..s.clone() });
        for v in &variants {
            assert_ne!(row_hash(v), base, "{v:?}");
        }
    }

    #[test]
    fn length_prefix_prevents_field_shifting() {
        let a = RowFields { schema_name: b"ab", table_name: b"c", ..sample() };
        let b = RowFields { schema_name: b"a", table_name: b"bc", ..sample() };
        assert_ne!(row_hash(&a), row_hash(&b));
        // A NULL text and an empty text differ.
        let c = RowFields { row_id: Some(&b""[..]), ..sample() };
        let d = RowFields { row_id: None, ..sample() };
        assert_ne!(row_hash(&c), row_hash(&d));
    }

    #[test]
    fn root_depends_on_order_and_count() {
        let h1 = [1u8; 32];
        let h2 = [2u8; 32];
        let mut a = RootBuilder::new();
        a.push(1, &h1);
        a.push(2, &h2);
        let mut b = RootBuilder::new();
        b.push(2, &h2);
        b.push(1, &h1);
        let mut c = RootBuilder::new();
        c.push(1, &h1);
        assert_ne!(a.finish(), b.finish());
        let mut a2 = RootBuilder::new();
        a2.push(1, &h1);
        a2.push(2, &h2);
        assert_ne!(a2.finish(), c.finish());
        assert_ne!(RootBuilder::new().finish(), [0u8; 32]);
    }

    #[test]
    fn block_hash_covers_every_field() {
        let root = [3u8; 32];
        let prev = [4u8; 32];
        let b = BlockFields {
            block_id: 1,
            from_id: 0,
            through_id: 10,
            first_id: Some(1),
            last_id: Some(10),
            row_count: 10,
            root: &root,
            prev_hash: &prev,
            sealed_at_us: 5,
        };
        let base = block_hash(&b);
        let other = [9u8; 32];
        for v in [
            BlockFields { block_id: 2, ..b.clone() },
            BlockFields { from_id: 1, ..b.clone() },
            BlockFields { through_id: 11, ..b.clone() },
            BlockFields { first_id: None, ..b.clone() },
            BlockFields { last_id: Some(9), ..b.clone() },
            BlockFields { row_count: 9, ..b.clone() },
            BlockFields { root: &other, ..b.clone() },
            BlockFields { prev_hash: &other, ..b.clone() },
            BlockFields { sealed_at_us: 6, ..b.clone() },
        ] {
            assert_ne!(block_hash(&v), base);
        }
    }
}
